//! Intake, Postfix's cleanup: everything between "a session has an
//! envelope and a spooled body" and "the message is committed". The
//! recipient directory the session asks (routing, policy, accounts and
//! logins: [`directory`]); SPF, DKIM and DMARC of strangers' mail; the
//! binding of From: to the login; DKIM signing of our users' mail; the
//! queue's form of the message, and the commit. The server owns sockets,
//! threads, TLS and limits and hands the session's results here; spam
//! gates and milters belong here too. Never touches a socket.

pub mod directory;
pub mod gate;
pub mod milter;

use std::sync::Arc;

use crate::config::Config;
use crate::dkim::Keys;
use crate::mailauth::spf::SpfVerdict;
use crate::printable::escape;
use crate::protocol::address::Address;
use crate::protocol::reply::{self, Reply};
use crate::protocol::session::{Envelope, FromOwner, ListenerKind, NotQueued};
use crate::queue::content::{Body, Content};
use crate::queue::{MessageKind, NewMessage, NewRecipient, QueueHandle, QueueId};
pub use directory::{Directory, Mail};

/// Told the destination keys (`mx:DOMAIN`, `smarthost`, `local`) of each
/// message once it is committed.
pub type OnQueued = Box<dyn Fn(Vec<String>) + Send + Sync>;

/// What intake needs: the config, the gate, the directory, the keys to sign with,
/// the queue, and who to tell of new mail.
pub struct Intake {
    config: Arc<Config>,
    gate: gate::Gate,
    directory: Directory,
    dkim: Arc<Keys>,
    queue: QueueHandle,
    on_queued: Option<OnQueued>,
}

impl Intake {
    pub fn new(
        config: Arc<Config>,
        gate: gate::Gate,
        directory: Directory,
        dkim: Arc<Keys>,
        queue: QueueHandle,
        on_queued: Option<OnQueued>,
    ) -> Intake {
        Intake {
            config,
            gate,
            directory,
            dkim,
            queue,
            on_queued,
        }
    }

    /// The gate before a session on the MX port.
    pub fn gate(&self) -> &gate::Gate {
        &self.gate
    }

    /// What sessions ask about senders, recipients and logins.
    pub fn directory(&self) -> &Directory {
        &self.directory
    }

    /// The DKIM keys (a reload replaces them).
    pub fn dkim(&self) -> &Keys {
        &self.dkim
    }

    /// A message the session accepted, checked, signed and committed; the
    /// client hears 250 only if this returns `Ok`.
    pub fn accept(
        &self,
        envelope: Envelope<Mail>,
        body: Body,
        client: &str,
    ) -> Result<(), NotQueued> {
        commit(envelope, body, client, self)
    }

    /// Tells delivery that new mail is waiting, and for which
    /// destinations.
    fn message_queued(&self, destinations: Vec<String>) {
        if let Some(notify) = &self.on_queued {
            notify(destinations);
        }
    }
}

/// The queue's form of a message the session accepted.
fn queued_form(envelope: Envelope<Mail>, body: Body) -> Result<NewMessage, String> {
    let id = QueueId::parse(&envelope.id).ok_or("the session produced a bad queue id")?;
    Ok(NewMessage {
        id,
        sender: envelope.sender,
        recipients: envelope
            .recipients
            .into_iter()
            .map(|r| NewRecipient {
                address: r.target.address,
                original: r.original,
                route: r.target.route,
                domain: r.target.domain,
                notify: r.notify,
                orcpt: r.orcpt,
            })
            .collect(),
        content: Content {
            prefix: envelope.trace_header,
            body,
        },
        client_ip: Some(envelope.client_ip),
        helo: envelope.helo,
        auth_user: envelope.auth_user,
        auth_label: envelope.auth_label,
        listener: envelope.listener.name().to_string(),
        eight_bit: envelope.eight_bit,
        smtputf8: envelope.smtputf8,
        kind: MessageKind::Normal,
        ret: envelope.ret,
        envid: envelope.envid,
        quarantine: None,
    })
}

/// DKIM-signs mail from local users (authenticated, or local submission)
/// whose sender domain has a key. Mail that should be signed and cannot
/// be is refused for now (4xx) rather than sent to fail DMARC.
fn sign(message: &mut NewMessage, intake: &Intake) -> Result<(), String> {
    if message.auth_user.is_none() {
        return Ok(());
    }
    let Some((_, domain)) = message.sender.rsplit_once('@') else {
        return Ok(());
    };
    let signed = message
        .content
        .reader()
        .map_err(|e| e.to_string())
        .and_then(|mut reader| {
            intake
                .dkim
                .signer()
                .sign(domain, &mut reader, std::time::SystemTime::now())
                .map_err(|e| e.to_string())
        });
    match signed {
        Ok(Some(header)) => {
            let mut prefix = header.into_bytes();
            prefix.append(&mut message.content.prefix);
            message.content.prefix = prefix;
            Ok(())
        }
        Ok(None) => Ok(()),
        Err(error) => {
            log::error!("{}: cannot DKIM-sign: {error}", message.id);
            Err(format!("cannot DKIM-sign: {error}"))
        }
    }
}

/// Whether every From: address of a message belongs to its login. With
/// `auth.sender_login_match`, a message whose From: does not is refused
/// (553 5.7.1, as Postfix's smtpd_sender_login_maps does); without it, it
/// is sent but never DKIM-signed: our signature would vouch for a From:
/// the login does not own.
fn from_owned_by(
    message: &NewMessage,
    owner: &FromOwner,
    intake: &Intake,
) -> Result<bool, NotQueued> {
    let max =
        usize::try_from(intake.config.limits.max_header_size.bytes() + 65536).unwrap_or(usize::MAX);
    let section = message
        .content
        .reader()
        .and_then(|mut reader| crate::dkim::verify::read_header_section(&mut reader, max))
        .map_err(|error| {
            log::error!("{}: cannot read the header section: {error}", message.id);
            NotQueued::Failed(error.to_string())
        })?;
    let strangers: Vec<String> = crate::mailauth::dmarc::from_addresses(&section.fields)
        .into_iter()
        .filter(|text| {
            !Address::parse(text).is_ok_and(|address| intake.directory.owns(owner, &address))
        })
        .collect();
    let Some(first) = strangers.first() else {
        return Ok(true);
    };
    if intake.config.auth.sender_login_match {
        log::info!(
            "{}: refused: From: <{}> is not owned by {}",
            message.id,
            escape(first),
            owner.login
        );
        return Err(NotQueued::Refused(Reply::new(
            reply::SENDER_NOT_OWNED,
            format!(
                "From: address <{}> not owned by {}",
                escape(first),
                owner.login
            ),
        )));
    }
    log::info!(
        "{}: not DKIM-signed: From: <{}> is not owned by {}",
        message.id,
        escape(first),
        owner.login
    );
    Ok(false)
}

/// SPF (from MAIL FROM), DKIM and DMARC of a message from a stranger on
/// the MX port: the results go in an Authentication-Results field after
/// our Received field; a DMARC p=reject failure is refused.
fn check_authentication(
    message: &mut NewMessage,
    spf: &SpfVerdict,
    intake: &Intake,
) -> Result<(), NotQueued> {
    let checked = match message.content.body.reader() {
        Ok(mut reader) => intake.directory.check_message(spf, &mut reader),
        Err(error) => Some(Err(error)),
    };
    let verdict = match checked {
        None => return Ok(()),
        Some(Ok(verdict)) => verdict,
        Some(Err(error)) => {
            log::error!(
                "{}: cannot read the message to check it: {error}",
                message.id
            );
            return Err(NotQueued::Failed(error.to_string()));
        }
    };
    log::info!("{}: {}", message.id, verdict.summary);
    if let Some(refusal) = verdict.refusal {
        return Err(NotQueued::Refused(refusal));
    }
    message
        .content
        .prefix
        .extend_from_slice(verdict.header.as_bytes());
    Ok(())
}

/// What the session saw of the client that the queue does not keep, for
/// the milters.
struct Seen {
    client_name: Option<String>,
    tls_version: Option<String>,
}

/// The message after the content filters configured for its listener:
/// changed as they asked, `None` when one discarded it, or refused.
/// Clients in `relay.trusted_networks` are not filtered.
fn filtered(
    mut message: NewMessage,
    seen: &Seen,
    client: &str,
    intake: &Intake,
) -> Result<Option<NewMessage>, NotQueued> {
    let config = &intake.config;
    let listener = message.listener.clone();
    let asked = config.milter.iter().any(|m| m.on.contains(&listener));
    let trusted = message
        .client_ip
        .is_some_and(|ip| config.relay.is_trusted(ip))
        && listener != ListenerKind::Local.name();
    if !asked || trusted {
        return Ok(Some(message));
    }
    let id = message.id.to_string();
    let bounds = milter::Bounds::of(config);
    let content = std::mem::replace(&mut message.content, Content::in_memory(Vec::new()));
    let rcpt_addresses: Vec<String> = message
        .recipients
        .iter()
        .map(|r| r.original.clone().unwrap_or_else(|| r.address.clone()))
        .collect();
    let mut draft = milter::Draft::of(
        &config.data_dir,
        content,
        message.sender.clone(),
        mail_parameters(&message),
        rcpt_addresses.clone(),
        bounds,
    )
    .map_err(|error| NotQueued::Failed(format!("cannot read the message: {error}")))?;
    let session = milter::Session {
        queue_id: &id,
        hostname: &config.hostname,
        client_ip: message
            .client_ip
            .unwrap_or(std::net::IpAddr::from([0, 0, 0, 0])),
        client_name: seen.client_name.as_deref(),
        helo: message.helo.as_deref(),
        auth_user: message.auth_user.as_deref(),
        tls_version: seen.tls_version.as_deref(),
    };
    let verdict = milter::filter(&config.milter, &listener, &session, &mut draft, bounds);
    let first_rcpt = rcpt_addresses.first().cloned().unwrap_or_default();
    let context = format!(
        "from=<{}> to=<{}> proto=ESMTP helo=<{}>",
        escape(&message.sender),
        escape(&first_rcpt),
        escape(message.helo.as_deref().unwrap_or(""))
    );
    match verdict {
        milter::Verdict::Refuse(reply) => {
            log::info!(
                "{id}: milter-reject: END-OF-MESSAGE from {client}: {}; {context}",
                escape(reply.to_wire().trim_end())
            );
            return Err(NotQueued::Refused(reply));
        }
        milter::Verdict::Discard => {
            log::info!(
                "{id}: milter-discard: END-OF-MESSAGE from {client}: milter triggers DISCARD \
                 action; {context}"
            );
            return Ok(None);
        }
        milter::Verdict::Accept => {}
    }
    apply_recipients(&mut message, &draft.recipients, &rcpt_addresses, intake);
    if message.recipients.is_empty() {
        log::info!("{id}: milter-discard: every recipient removed by the milters; {context}");
        return Ok(None);
    }
    message.quarantine = draft.quarantine.take();
    message.content = draft.into_content().map_err(|error| {
        NotQueued::Failed(format!("cannot write the filtered message: {error}"))
    })?;
    Ok(Some(message))
}

/// The MAIL FROM parameters the message came with, as the milters are
/// told them.
fn mail_parameters(message: &NewMessage) -> Vec<String> {
    let mut args = vec![format!("SIZE={}", message.content.len())];
    if message.eight_bit {
        args.push("BODY=8BITMIME".into());
    }
    if message.smtputf8 {
        args.push("SMTPUTF8".into());
    }
    if let Some(ret) = message.ret {
        args.push(format!("RET={}", ret.as_str()));
    }
    if let Some(envid) = &message.envid {
        args.push(format!(
            "ENVID={}",
            crate::protocol::dsn::xtext_encode(envid)
        ));
    }
    args
}

/// The recipients after the milters: those they deleted go, those they
/// added are routed as any recipient would be (one that routes nowhere is
/// logged and left out).
fn apply_recipients(
    message: &mut NewMessage,
    wanted: &[String],
    given: &[String],
    intake: &Intake,
) {
    let kept = |address: &str| wanted.iter().any(|w| w.eq_ignore_ascii_case(address));
    message
        .recipients
        .retain(|r| kept(r.original.as_deref().unwrap_or(&r.address)));
    for added in wanted
        .iter()
        .filter(|w| !given.iter().any(|g| g.eq_ignore_ascii_case(w)))
    {
        let routed = Address::parse(added)
            .map_err(|e| e.to_string())
            .and_then(|address| intake.directory.route_added(&address));
        match routed {
            Ok(targets) => {
                for target in targets {
                    message.recipients.push(NewRecipient {
                        original: (target.address != *added).then(|| added.clone()),
                        address: target.address,
                        route: target.route,
                        domain: target.domain,
                        notify: None,
                        orcpt: None,
                    });
                }
            }
            Err(why) => log::warn!(
                "{}: a milter added <{}>, which cannot be delivered ({why}); left out",
                message.id,
                escape(added)
            ),
        }
    }
}

/// Hands the message to the queue writer and logs the outcome; the client
/// hears 250 only if this returns `Ok`.
pub(crate) fn commit(
    envelope: Envelope<Mail>,
    body: Body,
    client: &str,
    intake: &Intake,
) -> Result<(), NotQueued> {
    let spf = envelope.spf.clone();
    let envelope_from_owner = envelope.from_owner.clone();
    let seen = Seen {
        client_name: envelope.client_name.clone(),
        tls_version: envelope.tls_version.clone(),
    };
    let mut message = queued_form(envelope, body).map_err(NotQueued::Failed)?;
    if let Some(spf) = &spf {
        check_authentication(&mut message, spf, intake)?;
    }
    let Some(mut message) = filtered(message, &seen, client, intake)? else {
        return Ok(());
    };
    let from_owned = match &envelope_from_owner {
        Some(owner) => from_owned_by(&message, owner, intake)?,
        None => true,
    };
    if from_owned {
        sign(&mut message, intake).map_err(NotQueued::Failed)?;
    }
    let id = message.id.clone();
    let summary = log_summary(&message, client);
    let mut destinations: Vec<String> = message.recipients.iter().map(|r| r.route.key()).collect();
    destinations.sort_unstable();
    destinations.dedup();
    match intake.queue.insert(message) {
        Ok(()) => {
            log::info!("{id}: accepted {summary}");
            intake.message_queued(destinations);
            Ok(())
        }
        Err(error) => {
            log::error!("{id}: NOT queued ({error}): {summary}");
            Err(NotQueued::Failed(error.to_string()))
        }
    }
}

/// What the accepted (or NOT queued) line says about a message, in
/// Postfix's words. Written into one buffer: built with `format!` and a
/// `join`, it was a dozen allocations for every message.
fn log_summary(message: &NewMessage, client: &str) -> String {
    use std::fmt::Write as _;
    let mut summary = String::with_capacity(256);
    let _ = write!(
        summary,
        "from=<{}>, size={}, nrcpt={}, client={client}, helo=<{}>, listener={}",
        message.sender,
        message.content.len(),
        message.recipients.len(),
        escape(message.helo.as_deref().unwrap_or("")),
        message.listener,
    );
    // A local user was named by the kernel, not by SASL: client= already
    // says local[uid=N].
    if let Some(user) = &message.auth_user
        && message.listener != ListenerKind::Local.name()
    {
        let _ = write!(summary, ", sasl_username={user}");
        if let Some(label) = &message.auth_label {
            let _ = write!(summary, " ({label})");
        }
    }
    summary.push_str(", to=");
    for (index, recipient) in message.recipients.iter().enumerate() {
        if index > 0 {
            summary.push(',');
        }
        let _ = write!(summary, "<{}>", recipient.address);
    }
    summary
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(listener: &str, auth: Option<(&str, Option<&str>)>) -> NewMessage {
        let recipient = |address: &str| NewRecipient {
            address: address.to_string(),
            original: None,
            route: crate::envelope::Route::SmartHost,
            domain: "example.test".to_string(),
            notify: None,
            orcpt: None,
        };
        NewMessage {
            id: QueueId::generate(),
            sender: "a@example.org".to_string(),
            recipients: vec![recipient("b@example.test"), recipient("c@example.test")],
            content: Content::in_memory(b"Subject: x\r\n\r\nbody\r\n".to_vec()),
            client_ip: None,
            helo: Some("client.test".to_string()),
            auth_user: auth.map(|(user, _)| user.to_string()),
            auth_label: auth.and_then(|(_, label)| label.map(str::to_string)),
            listener: listener.to_string(),
            eight_bit: false,
            smtputf8: false,
            kind: MessageKind::Normal,
            ret: None,
            envid: None,
            quarantine: None,
        }
    }

    #[test]
    fn the_accepted_line_says_who_sent_what_to_whom() {
        assert_eq!(
            log_summary(&message("smtp", None), "unknown[192.0.2.1]"),
            "from=<a@example.org>, size=20, nrcpt=2, client=unknown[192.0.2.1], \
             helo=<client.test>, listener=smtp, to=<b@example.test>,<c@example.test>"
        );
        assert_eq!(
            log_summary(
                &message("submission", Some(("u@example.org", Some("phone")))),
                "c[192.0.2.1]"
            ),
            "from=<a@example.org>, size=20, nrcpt=2, client=c[192.0.2.1], helo=<client.test>, \
             listener=submission, sasl_username=u@example.org (phone), \
             to=<b@example.test>,<c@example.test>"
        );
        // The kernel named a local user; client= already says which.
        let local = log_summary(
            &message("local", Some(("u@example.org", None))),
            "local[uid=1000]",
        );
        assert!(!local.contains("sasl_username"), "{local}");
    }
}
