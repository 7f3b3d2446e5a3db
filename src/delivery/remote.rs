//! Delivery over SMTP: to the MX hosts of a domain (opportunistic
//! STARTTLS) or to the configured smart host (TLS required and verified by
//! default, AUTH). One SMTP transaction per message and destination;
//! replies are kept per recipient.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use rustls::ClientConfig;

use super::DeliveryContext;
use super::client::{self, ClientError, SmtpClient};
use super::connections::{self, OpenConnection};
use super::outcome::{self, Attempt, Stage};
use crate::config::SmarthostTls;
use crate::dns::DnsFailure;
use crate::host::assigned_here;
use crate::mta_sts::Mode;
use crate::policy::outbound::Forbidden;
use crate::protocol::client::{Extensions, ServerReply};
use crate::protocol::dsn::{self, Notify, Ret};
use crate::queue::delivery::StoredMessage;

/// The message as the remote side needs it.
pub struct Outbound<'a> {
    pub sender: &'a str,
    pub recipients: Vec<RemoteRecipient<'a>>,
    /// The queued message, read a chunk at a time while it is sent.
    pub message: &'a StoredMessage,
    pub size: u64,
    pub eight_bit: bool,
    pub smtputf8: bool,
    /// RFC 3461 requests, passed on when the next hop speaks DSN.
    pub ret: Option<Ret>,
    pub envid: Option<&'a str>,
}

pub struct RemoteRecipient<'a> {
    pub address: &'a str,
    pub notify: Option<Notify>,
    pub orcpt: Option<&'a str>,
}

/// How TLS is handled with one destination.
#[derive(Clone)]
enum TlsPolicy {
    /// MX hosts: STARTTLS when offered; on a failed handshake retry in
    /// plaintext if `fallback`, else try the next host.
    Opportunistic { fallback: bool },
    /// Smart host: TLS or nothing (implicit TLS on port 465).
    Required {
        config: Arc<ClientConfig>,
        implicit: bool,
        /// The certificate is checked (smarthost_tls = "verify").
        verified: bool,
    },
    /// `smarthost_tls = "none"`: plaintext is acceptable.
    Plaintext,
}

/// What one host did with the message.
enum HostResult {
    /// The host answered for every recipient (in envelope order); `true`
    /// when it took the DSN requests along; how many messages the
    /// connection has carried.
    Answered(Vec<Attempt>, bool, usize),
    /// Could not hand the message to this host; try the next one.
    TryNext(String),
    /// TLS handshake failed: retry this host in plaintext.
    TlsFailed(String),
}

/// Result per recipient, and the relay description for the log.
pub struct RemoteOutcome {
    pub attempts: Vec<Attempt>,
    pub relay: Option<String>,
    /// The host that took the message speaks DSN and got the requests.
    pub peer_reports: bool,
    /// Messages the connection carried, this one included (Postfix's
    /// conn_use); 0 when none was made.
    pub conn_use: usize,
}

impl RemoteOutcome {
    fn all(envelope: &Outbound, attempt: Attempt) -> RemoteOutcome {
        RemoteOutcome {
            attempts: all(envelope, attempt),
            relay: None,
            peer_reports: false,
            conn_use: 0,
        }
    }
}

fn all(envelope: &Outbound, attempt: Attempt) -> Vec<Attempt> {
    envelope
        .recipients
        .iter()
        .map(|_| attempt.clone())
        .collect()
}

/// Delivers to the MX hosts of `domain`, or to the host an address
/// literal names, at addresses the outbound policy allows.
pub fn to_domain(ctx: &DeliveryContext, domain: &str, envelope: &Outbound) -> RemoteOutcome {
    let config = &ctx.config.delivery;
    let literal = crate::protocol::address::Domain::parse(domain)
        .ok()
        .and_then(|d| d.literal_ip());
    let mut hosts: Vec<String> = if let Some(ip) = literal {
        vec![ip.to_string()]
    } else {
        match ctx.dns.mail_hosts(domain) {
            Ok(hosts) => hosts.into_iter().map(|h| h.name).collect(),
            Err(failure) => {
                let status = match &failure {
                    DnsFailure::NullMx => outcome::NULL_MX,
                    DnsFailure::NoSuchDomain | DnsFailure::NoMailHosts => outcome::NO_SUCH_DOMAIN,
                    DnsFailure::Temporary(_) => outcome::DNS_TEMPORARY,
                };
                let text = format!("Domain {domain}: {failure}");
                return RemoteOutcome::all(envelope, Attempt::local(status, Stage::Routing, text));
            }
        }
    };
    let mut policy = TlsPolicy::Opportunistic {
        fallback: config.plaintext_fallback,
    };
    let mut destination = crate::envelope::Destination::Domain(domain.to_string()).key();
    if literal.is_none() {
        match mta_sts(ctx, domain, &mut hosts) {
            Err(attempt) => return RemoteOutcome::all(envelope, attempt),
            Ok(Some(verified)) => {
                // RFC 8461 4.2: TLS with a certificate valid for the MX
                // host's name, or not at all.
                policy = TlsPolicy::Required {
                    config: verified,
                    implicit: false,
                    verified: true,
                };
                // Cached connections made without verification are not
                // taken for these.
                destination.push_str(" mta-sts");
            }
            Ok(None) => {}
        }
    }
    let route = Hosts {
        destination,
        hosts: &hosts,
        port: config.port,
        checked: true,
        tls: &policy,
        credentials: None,
    };
    try_hosts(ctx, &route, envelope)
}

/// Applies the domain's MTA-STS policy to its MX hosts: in enforce mode
/// only listed hosts stay, and the TLS configuration that verifies them is
/// returned; `Err` when the policy lists none of them.
fn mta_sts(
    ctx: &DeliveryContext,
    domain: &str,
    hosts: &mut Vec<String>,
) -> Result<Option<Arc<ClientConfig>>, Attempt> {
    let (Some(policies), Some(verified)) = (&ctx.mta_sts, &ctx.tls_mx_verified) else {
        return Ok(None);
    };
    let Some(sts) = policies.for_domain(domain) else {
        return Ok(None);
    };
    let unlisted: Vec<&String> = hosts.iter().filter(|h| !sts.allows_host(h)).collect();
    match sts.mode {
        Mode::Enforce => {
            if unlisted.len() == hosts.len() {
                let text = format!(
                    "MTA-STS policy {} of {domain} lists none of its MX hosts ({})",
                    sts.id,
                    hosts.join(", ")
                );
                return Err(Attempt::local(
                    outcome::MTA_STS_NO_LISTED_MX,
                    Stage::Routing,
                    text,
                ));
            }
            hosts.retain(|h| sts.allows_host(h));
            Ok(Some(Arc::clone(verified)))
        }
        Mode::Testing => {
            for host in unlisted {
                log::warn!(
                    "MTA-STS (testing): {domain}: MX {host} is not in policy {}; delivering anyway",
                    sts.id
                );
            }
            Ok(None)
        }
        Mode::None => Ok(None),
    }
}

/// Delivers to the smart host.
pub fn to_smarthost(ctx: &DeliveryContext, envelope: &Outbound) -> RemoteOutcome {
    let config = &ctx.config.delivery;
    let misconfigured = |text: String| {
        RemoteOutcome::all(
            envelope,
            Attempt::local(outcome::SMARTHOST_MISCONFIGURED, Stage::Routing, text),
        )
    };
    let Some(smarthost) = &config.smarthost else {
        return misconfigured("No smart host configured".into());
    };
    let (host, port) = match crate::config::parse_host_port(smarthost) {
        Ok(parsed) => parsed,
        Err(error) => return misconfigured(error),
    };
    // RFC 8314: port 465 speaks TLS from the first byte, unless told.
    let implicit = config.smarthost_implicit_tls.unwrap_or(port == 465);
    let policy = match config.smarthost_tls {
        SmarthostTls::None => TlsPolicy::Plaintext,
        SmarthostTls::Encrypt => TlsPolicy::Required {
            config: Arc::clone(&ctx.tls_unverified),
            implicit,
            verified: false,
        },
        SmarthostTls::Verify => match &ctx.tls_smarthost {
            Some(config) => TlsPolicy::Required {
                config: Arc::clone(config),
                implicit,
                verified: true,
            },
            None => {
                return RemoteOutcome::all(
                    envelope,
                    Attempt::local(
                        outcome::SMARTHOST_TLS_UNAVAILABLE,
                        Stage::Routing,
                        "Smart host TLS configuration failed",
                    ),
                );
            }
        },
    };
    let credentials = match (&config.smarthost_user, &config.smarthost_password_file) {
        (Some(user), Some(file)) => match std::fs::read_to_string(file) {
            // Read at each delivery, so a rotated password needs no restart.
            Ok(password) => Some((
                user.clone(),
                password.trim_end_matches(['\n', '\r']).to_string(),
            )),
            Err(error) => {
                return misconfigured(format!(
                    "Cannot read smarthost_password_file {}: {error}",
                    file.display()
                ));
            }
        },
        _ => None,
    };
    // The smart host is the operator's choice: trusted as given, wherever it is.
    let hosts = [host];
    let route = Hosts {
        destination: "smarthost".into(),
        hosts: &hosts,
        port,
        checked: false,
        tls: &policy,
        credentials: credentials.as_ref(),
    };
    try_hosts(ctx, &route, envelope)
}

/// The hosts to try for one job and how to talk to them.
struct Hosts<'a> {
    /// The destination's key, for the connection cache.
    destination: String,
    hosts: &'a [String],
    port: u16,
    /// Subject to the outbound address policy (MX and literal delivery).
    checked: bool,
    tls: &'a TlsPolicy,
    credentials: Option<&'a (String, String)>,
}

fn try_hosts(ctx: &DeliveryContext, route: &Hosts, envelope: &Outbound) -> RemoteOutcome {
    let timeouts = client::Timeouts::from_config(&ctx.config.delivery);
    let deadline = Instant::now() + timeouts.attempt;
    if let Some(mut session) = ctx.connections.take(&route.destination) {
        session.client.set_deadline(deadline);
        if let Some(outcome) = reuse(ctx, session, route, envelope) {
            return outcome;
        }
    }
    let port = route.port;
    let mut last_error = String::from("no host could be tried");
    let mut last_relay = None;
    let mut forbidden: Option<Forbidden> = None;
    let mut tried = false;
    for host in route.hosts {
        let addresses = match ctx.dns.addresses(host, ctx.config.delivery.address_family) {
            Ok(addresses) => addresses,
            Err(failure) => {
                last_error = format!("{host}: {failure}");
                continue;
            }
        };
        for ip in addresses {
            let peer = SocketAddr::new(ip, port);
            let relay = format!("{host}[{ip}]:{port}");
            if Instant::now() >= deadline {
                last_error = format!(
                    "{relay}: not tried: the attempt took longer than delivery.attempt_timeout ({})",
                    ctx.config.delivery.attempt_timeout
                );
                break;
            }
            if route.checked
                && let Err(why) = ctx.outbound.check(peer, assigned_here)
            {
                log::info!("{relay}: not connecting: {why}");
                last_error = format!("{relay}: {why}");
                forbidden = forbidden.or(Some(why));
                continue;
            }
            tried = true;
            last_relay = Some(relay.clone());
            let connection = Connection {
                host,
                peer,
                timeouts: &timeouts,
                deadline,
            };
            let result = deliver_with_fallback(ctx, &connection, route, envelope, &relay);
            match result {
                HostResult::Answered(attempts, peer_reports, conn_use) => {
                    return RemoteOutcome {
                        attempts,
                        relay: Some(relay),
                        peer_reports,
                        conn_use,
                    };
                }
                HostResult::TryNext(why) | HostResult::TlsFailed(why) => {
                    log::info!("{relay}: {why}");
                    last_error = format!("{relay}: {why}");
                }
            }
        }
    }
    let attempt = given_up(route, tried, forbidden, last_error);
    RemoteOutcome {
        attempts: all(envelope, attempt),
        relay: last_relay,
        peer_reports: false,
        conn_use: 0,
    }
}

/// One address, over TLS as `route` asks, and again in plaintext when
/// the handshake failed and the policy allows it.
fn deliver_with_fallback(
    ctx: &DeliveryContext,
    connection: &Connection,
    route: &Hosts,
    envelope: &Outbound,
    relay: &str,
) -> HostResult {
    let result = deliver_to_host(ctx, connection, route, route.tls, envelope);
    match result {
        HostResult::TlsFailed(why) => {
            log::info!("{relay}: TLS handshake failed ({why}); retrying in plaintext");
            deliver_to_host(ctx, connection, route, &TlsPolicy::Plaintext, envelope)
        }
        result => result,
    }
}

/// Why no host took the message. Every address the domain's DNS named
/// was refused by policy: the mail can never be delivered from here, so
/// say so now rather than in 5 days.
fn given_up(
    route: &Hosts,
    tried: bool,
    forbidden: Option<Forbidden>,
    last_error: String,
) -> Attempt {
    match (tried, forbidden) {
        (false, Some(Forbidden::OwnListener)) => Attempt::local(
            outcome::LOOPS_BACK,
            Stage::Routing,
            format!(
                "mail for {} loops back to myself ({last_error})",
                route.hosts.join(", ")
            ),
        ),
        (false, Some(Forbidden::SpecialPurpose(_))) => {
            Attempt::local(outcome::DESTINATION_NOT_ALLOWED, Stage::Routing, last_error)
        }
        _ => Attempt::local(outcome::NO_ANSWER, Stage::Connect, last_error),
    }
}

/// The next message over a cached connection. `None` when the connection
/// turned out to be gone before the message was complete: the caller
/// sends it over a new one, so nothing is lost and nothing sent twice.
fn reuse(
    ctx: &DeliveryContext,
    mut session: OpenConnection,
    route: &Hosts,
    envelope: &Outbound,
) -> Option<RemoteOutcome> {
    session.uses += 1;
    let outcome = |attempts, session: &OpenConnection| RemoteOutcome {
        attempts,
        relay: Some(session.relay.clone()),
        peer_reports: session.extensions.dsn,
        conn_use: session.uses,
    };
    if let Some(refusal) = unsendable(&session.extensions, envelope) {
        let done = outcome(all(envelope, refusal), &session);
        ctx.connections.put(&route.destination, session);
        return Some(done);
    }
    let mut ended = false;
    match send_message(
        ctx,
        &mut session.client,
        &session.extensions,
        envelope,
        Reset::First,
        &mut ended,
    ) {
        Ok(attempts) => {
            let done = outcome(attempts, &session);
            ctx.connections.put(&route.destination, session);
            Some(done)
        }
        Err(error) if !ended => {
            log::info!(
                "{}: reused connection unfit ({error}); sending over a new one",
                session.relay
            );
            None
        }
        Err(error) => {
            // The server may have taken it: retry later, as after any
            // connection lost while waiting for the final reply.
            let text = format!(
                "{}: lost connection after end of data: {error}",
                session.relay
            );
            Some(outcome(
                all(
                    envelope,
                    Attempt::local(outcome::NO_ANSWER, Stage::EndOfData, text),
                ),
                &session,
            ))
        }
    }
}

/// One host of a delivery attempt, and the attempt's time.
struct Connection<'a> {
    host: &'a str,
    peer: SocketAddr,
    timeouts: &'a client::Timeouts,
    deadline: Instant,
}

/// One connection, one transaction.
fn deliver_to_host(
    ctx: &DeliveryContext,
    connection: &Connection,
    route: &Hosts,
    policy: &TlsPolicy,
    envelope: &Outbound,
) -> HostResult {
    let (host, peer) = (connection.host, connection.peer);
    let credentials = route.credentials;
    let implicit = matches!(policy, TlsPolicy::Required { implicit: true, .. });
    let connected = if implicit {
        connect_implicit_tls(connection, policy)
    } else {
        SmtpClient::connect(peer, connection.timeouts, connection.deadline)
    };
    let (mut client, greeting) = match connected {
        Ok(connected) => connected,
        Err(error) => return HostResult::TryNext(format!("connect failed: {error}")),
    };
    if implicit {
        log_tls(&client, host, peer, policy);
    }
    if !greeting.is_positive() {
        client.quit();
        return HostResult::TryNext(format!("greeting: {greeting}"));
    }
    match transaction(
        ctx,
        &mut client,
        (host, peer),
        policy,
        credentials,
        envelope,
    ) {
        Ok((result, Some(extensions))) => {
            let session = OpenConnection {
                client,
                extensions,
                relay: format!("{host}[{}]:{}", peer.ip(), peer.port()),
                uses: 1,
            };
            ctx.connections.put(&route.destination, session);
            result
        }
        Ok((result, None)) => {
            client.quit();
            result
        }
        Err(error) => HostResult::TryNext(format!("lost connection: {error}")),
    }
}

/// Postfix's line for an outbound TLS session: "Verified" when the
/// certificate was checked (the smart host), "Untrusted" otherwise (MX
/// hosts, whose certificates are rarely valid for their names).
fn log_tls(client: &SmtpClient, host: &str, peer: SocketAddr, policy: &TlsPolicy) {
    let trust = match policy {
        TlsPolicy::Required { verified: true, .. } => "Verified",
        _ => "Untrusted",
    };
    log::info!(
        "{trust} TLS connection established to {}[{}]:{}: {}",
        crate::printable::escape(host),
        peer.ip(),
        peer.port(),
        client.tls_description().unwrap_or_default()
    );
}

fn connect_implicit_tls(
    connection: &Connection,
    policy: &TlsPolicy,
) -> Result<(SmtpClient, ServerReply), ClientError> {
    let TlsPolicy::Required { config, .. } = policy else {
        return Err(ClientError::Tls(
            "implicit TLS without a TLS configuration".into(),
        ));
    };
    SmtpClient::connect_tls(
        connection.peer,
        connection.timeouts,
        connection.deadline,
        Arc::clone(config),
        connection.host,
    )
}

/// EHLO, STARTTLS and AUTH as the policy asks: the extensions when the
/// connection is ready for a transaction, else what the host did.
fn open_session(
    ctx: &DeliveryContext,
    client: &mut SmtpClient,
    (host, peer): (&str, SocketAddr),
    policy: &TlsPolicy,
    credentials: Option<&(String, String)>,
    envelope: &Outbound,
) -> Result<Result<Extensions, HostResult>, ClientError> {
    let hostname = &ctx.config.hostname;
    let (hello, mut extensions) = client.hello(hostname)?;
    if !hello.is_positive() {
        return Ok(Err(HostResult::TryNext(format!(
            "EHLO/HELO refused: {hello}"
        ))));
    }
    if !client.is_tls() {
        let wanted = match policy {
            TlsPolicy::Opportunistic { .. } => {
                extensions.starttls.then(|| Arc::clone(&ctx.tls_unverified))
            }
            TlsPolicy::Required { config, .. } => {
                if !extensions.starttls {
                    return Ok(Err(HostResult::TryNext(
                        "TLS is required but the server does not offer STARTTLS".into(),
                    )));
                }
                Some(Arc::clone(config))
            }
            TlsPolicy::Plaintext => None,
        };
        if let Some(tls) = wanted {
            match client.starttls(tls, host) {
                Ok(Ok(())) => {
                    log_tls(client, host, peer, policy);
                    let (hello, again) = client.hello(hostname)?;
                    if !hello.is_positive() {
                        return Ok(Err(HostResult::TryNext(format!(
                            "EHLO after STARTTLS refused: {hello}"
                        ))));
                    }
                    extensions = again;
                }
                Ok(Err(refused)) => {
                    if matches!(policy, TlsPolicy::Required { .. }) {
                        return Ok(Err(HostResult::TryNext(format!(
                            "STARTTLS refused: {refused}"
                        ))));
                    }
                }
                Err(ClientError::Tls(why)) => {
                    return Ok(Err(match policy {
                        TlsPolicy::Opportunistic { fallback: true } => HostResult::TlsFailed(why),
                        _ => HostResult::TryNext(format!("TLS handshake failed: {why}")),
                    }));
                }
                Err(other) => return Err(other),
            }
        }
    }
    if let Some((user, password)) = credentials {
        if !client.is_tls() && !matches!(policy, TlsPolicy::Plaintext) {
            return Ok(Err(HostResult::TryNext(
                "refusing to send credentials without TLS".into(),
            )));
        }
        let reply = client.authenticate(&extensions, user, password)?;
        if !reply.is_positive() {
            // A wrong password is the operator's to fix; keep the mail.
            let refused = Attempt::from_reply(&reply, Stage::Auth);
            let text = format!(
                "smart host refused AUTH (check smarthost_user and the password file): {}",
                refused.text
            );
            let attempt = refused.with_text(text).retried();
            return Ok(Err(HostResult::Answered(all(envelope, attempt), false, 1)));
        }
    }
    Ok(Ok(extensions))
}

/// One transaction on a new connection; the extensions come back when
/// the connection can carry another message.
fn transaction(
    ctx: &DeliveryContext,
    client: &mut SmtpClient,
    (host, peer): (&str, SocketAddr),
    policy: &TlsPolicy,
    credentials: Option<&(String, String)>,
    envelope: &Outbound,
) -> Result<(HostResult, Option<Extensions>), ClientError> {
    let extensions = match open_session(ctx, client, (host, peer), policy, credentials, envelope)? {
        Ok(extensions) => extensions,
        Err(result) => return Ok((result, None)),
    };
    if let Some(refusal) = unsendable(&extensions, envelope) {
        let result = HostResult::Answered(all(envelope, refusal), false, 1);
        return Ok((result, Some(extensions)));
    }
    let mut ended = false;
    let attempts = send_message(ctx, client, &extensions, envelope, Reset::No, &mut ended)?;
    let result = HostResult::Answered(attempts, extensions.dsn, 1);
    Ok((result, Some(extensions)))
}

/// Messages the server cannot take as they are (RFC 1870, 6152, 6531).
fn unsendable(extensions: &Extensions, envelope: &Outbound) -> Option<Attempt> {
    let refuse = |status, text: String| Some(Attempt::local(status, Stage::Hello, text));
    if let Some(limit) = extensions.size
        && envelope.size > limit
    {
        return refuse(
            outcome::TOO_BIG_FOR_PEER,
            format!(
                "Message size {} exceeds the remote server's limit of {limit}",
                envelope.size
            ),
        );
    }
    if envelope.smtputf8 && !extensions.smtputf8 {
        return refuse(
            outcome::PEER_LACKS_SMTPUTF8,
            "The remote server does not support SMTPUTF8".into(),
        );
    }
    if envelope.eight_bit && !extensions.eight_bit_mime {
        return refuse(
            outcome::PEER_LACKS_8BITMIME,
            "The remote server does not accept 8-bit data (no 8BITMIME)".into(),
        );
    }
    None
}

/// Whether a transaction starts with RSET.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Reset {
    No,
    /// On a reused connection: a reply other than 250 (or none) means
    /// the connection is not fit for the message, which is then sent
    /// over a new one. Nothing of the message has been sent by then.
    First,
}

/// `ended` turns true once the final dot is sent: from then on the
/// server may have taken the message even if its reply never comes.
fn send_message(
    ctx: &DeliveryContext,
    client: &mut SmtpClient,
    extensions: &Extensions,
    envelope: &Outbound,
    reset: Reset,
    ended: &mut bool,
) -> Result<Vec<Attempt>, ClientError> {
    let mail = mail_command(extensions, envelope);
    let rcpts = rcpt_commands(extensions, envelope);
    let replies = send_envelope(client, extensions, reset, &mail, &rcpts)?;
    if !replies.mail.is_positive() {
        let attempt = Attempt::from_reply(&replies.mail, Stage::MailFrom);
        if replies.data.as_ref().is_some_and(|r| r.code == 354) {
            client.send(b".\r\n")?;
            let _ = client.read_final_reply()?;
        }
        return Ok(all(envelope, attempt));
    }
    let mut attempts: Vec<Option<Attempt>> = replies
        .rcpts
        .iter()
        .map(|reply| (!reply.is_positive()).then(|| Attempt::from_reply(reply, Stage::RcptTo)))
        .collect();
    let accepted = attempts.iter().filter(|a| a.is_none()).count();
    let data_reply = match replies.data {
        Some(reply) => reply,
        None if accepted == 0 => {
            return Ok(attempts.into_iter().flatten().collect());
        }
        None => client.command("DATA", client::DATA_START_TIMEOUT)?,
    };
    if accepted == 0 {
        if data_reply.code == 354 {
            // Pipelined DATA went through with no recipient: end it empty.
            client.send(b".\r\n")?;
            let _ = client.read_final_reply()?;
        }
        return Ok(attempts.into_iter().flatten().collect());
    }
    if data_reply.code != 354 {
        let attempt = Attempt::from_reply(&data_reply, Stage::Data);
        return Ok(attempts
            .into_iter()
            .map(|a| a.unwrap_or_else(|| attempt.clone()))
            .collect());
    }
    let mut last = send_body(ctx, client, envelope.message)?;
    last.extend_from_slice(b".\r\n");
    // The dot goes with the end of the body: a failed write may have
    // carried it, so the message counts as possibly taken (retried later,
    // not at once over a new connection).
    *ended = true;
    client.send(&last)?;
    let final_reply = client.read_final_reply()?;
    let outcome = Attempt::from_reply(&final_reply, Stage::EndOfData);
    for attempt in &mut attempts {
        if attempt.is_none() {
            *attempt = Some(outcome.clone());
        }
    }
    Ok(attempts.into_iter().flatten().collect())
}

/// MAIL FROM with the parameters the server announced it takes.
fn mail_command(extensions: &Extensions, envelope: &Outbound) -> String {
    let mut mail = format!("MAIL FROM:<{}>", envelope.sender);
    if extensions.size.is_some() {
        mail.push_str(&format!(" SIZE={}", envelope.size));
    }
    if envelope.eight_bit && extensions.eight_bit_mime {
        mail.push_str(" BODY=8BITMIME");
    }
    if envelope.smtputf8 {
        mail.push_str(" SMTPUTF8");
    }
    // RFC 3461 6.2: DSN requests travel on to a next hop that speaks DSN.
    if extensions.dsn {
        if let Some(ret) = envelope.ret {
            mail.push_str(&format!(" RET={}", ret.as_str()));
        }
        if let Some(envid) = envelope.envid {
            mail.push_str(&format!(" ENVID={}", dsn::xtext_encode(envid)));
        }
    }
    mail
}

fn rcpt_commands(extensions: &Extensions, envelope: &Outbound) -> Vec<String> {
    envelope
        .recipients
        .iter()
        .map(|r| {
            let mut rcpt = format!("RCPT TO:<{}>", r.address);
            if extensions.dsn {
                if let Some(notify) = r.notify {
                    rcpt.push_str(&format!(" NOTIFY={}", notify.to_param()));
                }
                if let Some((kind, address)) = r.orcpt.and_then(|o| o.split_once(';')) {
                    rcpt.push_str(&format!(" ORCPT={kind};{}", dsn::xtext_encode(address)));
                }
            }
            rcpt
        })
        .collect()
}

/// The server's answers to MAIL, each RCPT, and a pipelined DATA.
struct EnvelopeReplies {
    mail: ServerReply,
    rcpts: Vec<ServerReply>,
    /// Sent only when pipelined: without pipelining, DATA waits until a
    /// recipient is known to be accepted.
    data: Option<ServerReply>,
}

fn send_envelope(
    client: &mut SmtpClient,
    extensions: &Extensions,
    reset: Reset,
    mail: &str,
    rcpts: &[String],
) -> Result<EnvelopeReplies, ClientError> {
    let reset_done = |reply: ServerReply| {
        if reply.code == 250 {
            Ok(())
        } else {
            Err(ClientError::Protocol(format!("RSET: {reply}")))
        }
    };
    if !extensions.pipelining {
        if reset == Reset::First {
            reset_done(client.command("RSET", connections::RSET_WAIT)?)?;
        }
        let mail = client.command(mail, client::COMMAND_TIMEOUT)?;
        let mut replies = Vec::new();
        if mail.is_positive() {
            for rcpt in rcpts {
                replies.push(client.command(rcpt, client::COMMAND_TIMEOUT)?);
            }
        }
        return Ok(EnvelopeReplies {
            mail,
            rcpts: replies,
            data: None,
        });
    }
    // RFC 2920: (RSET,) MAIL, every RCPT and DATA in one write: a reused
    // connection costs no round trip of its own.
    let mut batch = String::new();
    if reset == Reset::First {
        batch.push_str("RSET\r\n");
    }
    for command in std::iter::once(mail).chain(rcpts.iter().map(String::as_str)) {
        batch.push_str(command);
        batch.push_str("\r\n");
    }
    batch.push_str("DATA\r\n");
    client.send(batch.as_bytes())?;
    if reset == Reset::First {
        reset_done(client.read_reply(connections::RSET_WAIT)?)?;
    }
    let mail = client.read_reply(client::COMMAND_TIMEOUT)?;
    let mut replies = Vec::new();
    for _ in rcpts {
        replies.push(client.read_reply(client::COMMAND_TIMEOUT)?);
    }
    let data = client.read_reply(client::DATA_START_TIMEOUT)?;
    Ok(EnvelopeReplies {
        mail,
        rcpts: replies,
        data: Some(data),
    })
}

/// The most of a message held back before it is sent: a small message
/// goes out whole, with its final dot, in one write (one segment for the
/// server to take in instead of two).
const SEND_BLOCK: usize = 64 * 1024;

/// Streams the stored message to the server, dot-stuffed, a block at a
/// time, and returns the last block unsent so that the final dot can go
/// with it. If the message leaves the queue meanwhile (an operator deleted
/// it), this fails before the dot is sent, and the connection is dropped,
/// so the server discards what it got.
fn send_body(
    ctx: &DeliveryContext,
    client: &mut SmtpClient,
    message: &StoredMessage,
) -> Result<Vec<u8>, ClientError> {
    let mut stuffer = crate::protocol::client::DotStuffer::default();
    let mut out = Vec::new();
    let copied = super::worker::copy_content(ctx, message, |chunk| {
        stuffer.push(chunk, &mut out);
        if out.len() < SEND_BLOCK {
            return Ok(());
        }
        let sent = client
            .send(&out)
            .map_err(|e| std::io::Error::other(e.to_string()));
        out.clear();
        sent
    });
    if let Err(error) = copied {
        return Err(ClientError::Io(std::io::Error::other(format!(
            "while sending the message: {error}"
        ))));
    }
    stuffer.finish(&mut out);
    Ok(out)
}
