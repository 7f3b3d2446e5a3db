//! Delivery over SMTP: to the MX hosts of a domain (opportunistic
//! STARTTLS) or to the configured smart host (TLS required and verified by
//! default, AUTH). One SMTP transaction per message and destination;
//! replies are kept per recipient.

use std::net::SocketAddr;
use std::sync::Arc;

use rustls::ClientConfig;

use super::client::{self, ClientError, Extensions, ServerReply, SmtpClient};
use super::{Attempt, DeliveryContext};
use crate::config::SmarthostTls;
use crate::dns::DnsFailure;

/// The message as the remote side needs it.
pub struct Envelope<'a> {
    pub sender: &'a str,
    pub recipients: Vec<&'a str>,
    pub content: &'a [u8],
    pub eight_bit: bool,
    pub smtputf8: bool,
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
    },
    /// `smarthost_tls = "none"`: plaintext is acceptable.
    Plaintext,
}

/// What one host did with the message.
enum HostResult {
    /// The host answered for every recipient (in envelope order).
    Answered(Vec<Attempt>),
    /// Could not hand the message to this host; try the next one.
    TryNext(String),
    /// TLS handshake failed: retry this host in plaintext.
    TlsFailed(String),
}

/// Result per recipient, and the relay description for the log.
pub struct RemoteOutcome {
    pub attempts: Vec<Attempt>,
    pub relay: Option<String>,
}

fn all(envelope: &Envelope, attempt: Attempt) -> Vec<Attempt> {
    envelope
        .recipients
        .iter()
        .map(|_| attempt.clone())
        .collect()
}

/// Delivers to the MX hosts of `domain`.
pub fn to_domain(ctx: &DeliveryContext, domain: &str, envelope: &Envelope) -> RemoteOutcome {
    let config = &ctx.config.delivery;
    // A domain literal names the host directly (RFC 5321 4.1.3).
    let hosts: Vec<String> = if let Some(ip) = domain
        .strip_prefix('[')
        .and_then(|d| d.strip_suffix(']'))
        .map(|d| d.trim_start_matches("IPv6:").trim_start_matches("ipv6:"))
    {
        vec![ip.to_string()]
    } else {
        match ctx.dns.mail_hosts(domain) {
            Ok(hosts) => hosts.into_iter().map(|h| h.name).collect(),
            Err(failure) => {
                let attempt = match &failure {
                    DnsFailure::NullMx => Attempt::Permanent(format!(
                        "556 5.1.10 Domain {domain} does not accept mail (null MX)"
                    )),
                    DnsFailure::NoSuchDomain | DnsFailure::NoMailHosts => {
                        Attempt::Permanent(format!("550 5.1.2 Domain {domain}: {failure}"))
                    }
                    DnsFailure::Temporary(_) => {
                        Attempt::Temporary(format!("451 4.4.3 Domain {domain}: {failure}"))
                    }
                };
                return RemoteOutcome {
                    attempts: all(envelope, attempt),
                    relay: None,
                };
            }
        }
    };
    let policy = TlsPolicy::Opportunistic {
        fallback: config.plaintext_fallback,
    };
    try_hosts(ctx, &hosts, config.port, &policy, None, envelope)
}

/// Delivers to the smart host.
pub fn to_smarthost(ctx: &DeliveryContext, envelope: &Envelope) -> RemoteOutcome {
    let config = &ctx.config.delivery;
    let Some(smarthost) = &config.smarthost else {
        return RemoteOutcome {
            attempts: all(
                envelope,
                Attempt::Temporary("451 4.3.5 No smart host configured".into()),
            ),
            relay: None,
        };
    };
    let (host, port) = match crate::config::parse_host_port(smarthost) {
        Ok(parsed) => parsed,
        Err(error) => {
            return RemoteOutcome {
                attempts: all(envelope, Attempt::Temporary(format!("451 4.3.5 {error}"))),
                relay: None,
            };
        }
    };
    let policy = match config.smarthost_tls {
        SmarthostTls::None => TlsPolicy::Plaintext,
        SmarthostTls::Encrypt => TlsPolicy::Required {
            config: Arc::clone(&ctx.tls_unverified),
            implicit: port == 465,
        },
        SmarthostTls::Verify => match &ctx.tls_smarthost {
            Some(config) => TlsPolicy::Required {
                config: Arc::clone(config),
                implicit: port == 465,
            },
            None => {
                return RemoteOutcome {
                    attempts: all(
                        envelope,
                        Attempt::Temporary("451 4.7.5 Smart host TLS configuration failed".into()),
                    ),
                    relay: None,
                };
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
                return RemoteOutcome {
                    attempts: all(
                        envelope,
                        Attempt::Temporary(format!(
                            "451 4.3.5 Cannot read smarthost_password_file {}: {error}",
                            file.display()
                        )),
                    ),
                    relay: None,
                };
            }
        },
        _ => None,
    };
    try_hosts(ctx, &[host], port, &policy, credentials.as_ref(), envelope)
}

fn try_hosts(
    ctx: &DeliveryContext,
    hosts: &[String],
    port: u16,
    policy: &TlsPolicy,
    credentials: Option<&(String, String)>,
    envelope: &Envelope,
) -> RemoteOutcome {
    let mut last_error = String::from("no host could be tried");
    let mut last_relay = None;
    for host in hosts {
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
            last_relay = Some(relay.clone());
            let mut result = deliver_to_host(ctx, host, peer, policy, credentials, envelope);
            if let HostResult::TlsFailed(why) = &result {
                log::info!("{relay}: TLS handshake failed ({why}); retrying in plaintext");
                result = deliver_to_host(
                    ctx,
                    host,
                    peer,
                    &TlsPolicy::Plaintext,
                    credentials,
                    envelope,
                );
            }
            match result {
                HostResult::Answered(attempts) => {
                    return RemoteOutcome {
                        attempts,
                        relay: Some(relay),
                    };
                }
                HostResult::TryNext(why) | HostResult::TlsFailed(why) => {
                    log::info!("{relay}: {why}");
                    last_error = format!("{relay}: {why}");
                }
            }
        }
    }
    RemoteOutcome {
        attempts: all(
            envelope,
            Attempt::Temporary(format!("451 4.4.1 {last_error}")),
        ),
        relay: last_relay,
    }
}

/// One connection, one transaction.
fn deliver_to_host(
    ctx: &DeliveryContext,
    host: &str,
    peer: SocketAddr,
    policy: &TlsPolicy,
    credentials: Option<&(String, String)>,
    envelope: &Envelope,
) -> HostResult {
    let connect_timeout = ctx.config.delivery.connect_timeout.get();
    let implicit = matches!(policy, TlsPolicy::Required { implicit: true, .. });
    let connected = if implicit {
        connect_implicit_tls(peer, host, policy, connect_timeout)
    } else {
        SmtpClient::connect(peer, connect_timeout)
    };
    let (mut client, greeting) = match connected {
        Ok(connected) => connected,
        Err(error) => return HostResult::TryNext(format!("connect failed: {error}")),
    };
    if !greeting.is_positive() {
        client.quit();
        return HostResult::TryNext(format!("greeting: {greeting}"));
    }
    match transaction(ctx, &mut client, host, policy, credentials, envelope) {
        Ok(result) => {
            client.quit();
            result
        }
        Err(error) => HostResult::TryNext(format!("lost connection: {error}")),
    }
}

fn connect_implicit_tls(
    peer: SocketAddr,
    host: &str,
    policy: &TlsPolicy,
    timeout: std::time::Duration,
) -> Result<(SmtpClient, ServerReply), ClientError> {
    let TlsPolicy::Required { config, .. } = policy else {
        return Err(ClientError::Tls(
            "implicit TLS without a TLS configuration".into(),
        ));
    };
    SmtpClient::connect_tls(peer, timeout, Arc::clone(config), host)
}

fn transaction(
    ctx: &DeliveryContext,
    client: &mut SmtpClient,
    host: &str,
    policy: &TlsPolicy,
    credentials: Option<&(String, String)>,
    envelope: &Envelope,
) -> Result<HostResult, ClientError> {
    let hostname = &ctx.config.hostname;
    let (hello, mut extensions) = client.hello(hostname)?;
    if !hello.is_positive() {
        return Ok(HostResult::TryNext(format!("EHLO/HELO refused: {hello}")));
    }
    if !client.is_tls() {
        let wanted = match policy {
            TlsPolicy::Opportunistic { .. } => {
                extensions.starttls.then(|| Arc::clone(&ctx.tls_unverified))
            }
            TlsPolicy::Required { config, .. } => {
                if !extensions.starttls {
                    return Ok(HostResult::TryNext(
                        "TLS is required but the server does not offer STARTTLS".into(),
                    ));
                }
                Some(Arc::clone(config))
            }
            TlsPolicy::Plaintext => None,
        };
        if let Some(tls) = wanted {
            match client.starttls(tls, host) {
                Ok(Ok(())) => {
                    let (hello, again) = client.hello(hostname)?;
                    if !hello.is_positive() {
                        return Ok(HostResult::TryNext(format!(
                            "EHLO after STARTTLS refused: {hello}"
                        )));
                    }
                    extensions = again;
                }
                Ok(Err(refused)) => {
                    if matches!(policy, TlsPolicy::Required { .. }) {
                        return Ok(HostResult::TryNext(format!("STARTTLS refused: {refused}")));
                    }
                }
                Err(ClientError::Tls(why)) => {
                    return Ok(match policy {
                        TlsPolicy::Opportunistic { fallback: true } => HostResult::TlsFailed(why),
                        _ => HostResult::TryNext(format!("TLS handshake failed: {why}")),
                    });
                }
                Err(other) => return Err(other),
            }
        }
    }
    if let Some((user, password)) = credentials {
        if !client.is_tls() && !matches!(policy, TlsPolicy::Plaintext) {
            return Ok(HostResult::TryNext(
                "refusing to send credentials without TLS".into(),
            ));
        }
        let reply = client.authenticate(&extensions, user, password)?;
        if !reply.is_positive() {
            let attempt = if reply.is_transient() {
                Attempt::Temporary(format!("smart host refused AUTH: {reply}"))
            } else {
                // A wrong password is the operator's to fix; keep the mail.
                Attempt::Temporary(format!(
                    "smart host refused AUTH (check smarthost_user and the password file): {reply}"
                ))
            };
            return Ok(HostResult::Answered(all(envelope, attempt)));
        }
    }
    if let Some(refusal) = unsendable(&extensions, envelope) {
        return Ok(HostResult::Answered(all(
            envelope,
            Attempt::Permanent(refusal),
        )));
    }
    send_message(client, &extensions, envelope).map(HostResult::Answered)
}

/// Messages the server cannot take as they are (RFC 1870, 6152, 6531).
fn unsendable(extensions: &Extensions, envelope: &Envelope) -> Option<String> {
    if let Some(limit) = extensions.size
        && envelope.content.len() as u64 > limit
    {
        return Some(format!(
            "552 5.3.4 Message size {} exceeds the remote server's limit of {limit}",
            envelope.content.len()
        ));
    }
    if envelope.smtputf8 && !extensions.smtputf8 {
        return Some("553 5.6.7 The remote server does not support SMTPUTF8".into());
    }
    if envelope.eight_bit && !extensions.eight_bit_mime {
        return Some("554 5.6.3 The remote server does not accept 8-bit data (no 8BITMIME)".into());
    }
    None
}

fn send_message(
    client: &mut SmtpClient,
    extensions: &Extensions,
    envelope: &Envelope,
) -> Result<Vec<Attempt>, ClientError> {
    let mut mail = format!("MAIL FROM:<{}>", envelope.sender);
    if extensions.size.is_some() {
        mail.push_str(&format!(" SIZE={}", envelope.content.len()));
    }
    if envelope.eight_bit && extensions.eight_bit_mime {
        mail.push_str(" BODY=8BITMIME");
    }
    if envelope.smtputf8 {
        mail.push_str(" SMTPUTF8");
    }
    let rcpts: Vec<String> = envelope
        .recipients
        .iter()
        .map(|r| format!("RCPT TO:<{r}>"))
        .collect();

    let (mail_reply, rcpt_replies, data_reply) = if extensions.pipelining {
        // RFC 2920: MAIL, every RCPT and DATA in one write.
        let mut batch = format!("{mail}\r\n");
        for rcpt in &rcpts {
            batch.push_str(rcpt);
            batch.push_str("\r\n");
        }
        batch.push_str("DATA\r\n");
        client.send(batch.as_bytes())?;
        let mail_reply = client.read_reply(client::COMMAND_TIMEOUT)?;
        let mut rcpt_replies = Vec::new();
        for _ in &rcpts {
            rcpt_replies.push(client.read_reply(client::COMMAND_TIMEOUT)?);
        }
        let data_reply = client.read_reply(client::DATA_START_TIMEOUT)?;
        (mail_reply, rcpt_replies, Some(data_reply))
    } else {
        let mail_reply = client.command(&mail, client::COMMAND_TIMEOUT)?;
        let mut rcpt_replies = Vec::new();
        if mail_reply.is_positive() {
            for rcpt in &rcpts {
                rcpt_replies.push(client.command(rcpt, client::COMMAND_TIMEOUT)?);
            }
        }
        (mail_reply, rcpt_replies, None)
    };

    if !mail_reply.is_positive() {
        let attempt = reply_attempt(&mail_reply, "MAIL FROM");
        if data_reply.as_ref().is_some_and(|r| r.code == 354) {
            client.send(b".\r\n")?;
            let _ = client.read_reply(client::DATA_END_TIMEOUT)?;
        }
        return Ok(all(envelope, attempt));
    }
    let mut attempts: Vec<Option<Attempt>> = rcpt_replies
        .iter()
        .map(|reply| (!reply.is_positive()).then(|| reply_attempt(reply, "RCPT TO")))
        .collect();
    let accepted = attempts.iter().filter(|a| a.is_none()).count();
    let data_reply = match data_reply {
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
            let _ = client.read_reply(client::DATA_END_TIMEOUT)?;
        }
        return Ok(attempts.into_iter().flatten().collect());
    }
    if data_reply.code != 354 {
        let attempt = reply_attempt(&data_reply, "DATA");
        return Ok(attempts
            .into_iter()
            .map(|a| a.unwrap_or_else(|| attempt.clone()))
            .collect());
    }
    client.send(&client::dot_stuff(envelope.content))?;
    client.send(b".\r\n")?;
    let final_reply = client.read_reply(client::DATA_END_TIMEOUT)?;
    let outcome = if final_reply.is_positive() {
        Attempt::Delivered(final_reply.to_string())
    } else {
        reply_attempt(&final_reply, "end of DATA")
    };
    for attempt in &mut attempts {
        if attempt.is_none() {
            *attempt = Some(outcome.clone());
        }
    }
    Ok(attempts.into_iter().flatten().collect())
}

fn reply_attempt(reply: &ServerReply, after: &str) -> Attempt {
    let text = format!("{reply} (in reply to {after})");
    if reply.is_transient() {
        Attempt::Temporary(text)
    } else {
        Attempt::Permanent(text)
    }
}
