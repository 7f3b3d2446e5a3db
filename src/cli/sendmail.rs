//! `petrel sendmail [-t] [-i] [-f FROM] [RCPT…]`: the sendmail interface
//! that cron, PHP's mail() and friends expect, also when the binary is
//! invoked under the name `sendmail`. Reads the message from stdin, writes
//! it to the queue database directly (a local user is trusted like an
//! authenticated one) and wakes the running server.

use std::io::Read as _;
use std::os::unix::fs::MetadataExt as _;
use std::time::SystemTime;

use super::Failure;
use crate::config::Config;
use crate::delivery::control;
use crate::policy::{self, DomainStatus, RecipientDecision, RecipientFacts};
use crate::protocol::address::Address;
use crate::protocol::data::{ContentLimits, HeaderSummary, content_refusal, header_section_len};
use crate::queue::content::Content;
use crate::queue::{self, MessageKind, NewMessage, NewRecipient, QueueId};
use crate::routing::{self, Route, RouteError};
use crate::timefmt::rfc5322_date;

/// What the sendmail command line asked for.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Request {
    /// -t: recipients from To, Cc and Bcc (Bcc is then removed).
    pub from_headers: bool,
    /// -i / -oi: a line with a single dot does not end the message.
    pub ignore_dots: bool,
    /// -f: the envelope sender.
    pub sender: Option<String>,
    pub recipients: Vec<String>,
}

/// Parses sendmail's options; the ones that make no sense here (-F, -o
/// settings, -B, -N, -v, -odi ...) are accepted and ignored, as other
/// sendmail replacements do, so existing scripts keep working.
pub fn parse_args(args: &[String]) -> Result<Request, Failure> {
    let mut request = Request::default();
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--" => {
                request.recipients.extend(args.by_ref().cloned());
            }
            "-t" => request.from_headers = true,
            "-i" | "-oi" => request.ignore_dots = true,
            "-f" | "-r" => {
                let sender = args
                    .next()
                    .ok_or_else(|| Failure::Usage("-f needs an address".into()))?;
                request.sender = Some(sender.clone());
            }
            "-F" | "-O" | "-o" | "-B" | "-N" | "-R" | "-V" | "-X" | "-L" => {
                args.next();
            }
            flag if flag.starts_with("-f") && flag.len() > 2 => {
                request.sender = Some(flag[2..].to_string())
            }
            flag if flag.starts_with("-F") || flag.starts_with("-o") || flag.starts_with("-B") => {}
            "-bm" | "-v" | "-U" | "-G" | "-n" => {}
            flag if flag.starts_with("-b") => {
                return Err(Failure::Usage(format!(
                    "sendmail mode {flag} is not supported; petrel sendmail only submits mail (-bm)"
                )));
            }
            flag if flag.starts_with('-') => {
                return Err(Failure::Usage(format!("unknown sendmail option {flag}")));
            }
            recipient => request.recipients.push(recipient.to_string()),
        }
    }
    Ok(request)
}

/// Reads stdin up to EOF (or a lone "." line without -i); lines end in CRLF.
fn read_message(ignore_dots: bool) -> Result<Vec<u8>, Failure> {
    let mut raw = Vec::new();
    std::io::stdin()
        .lock()
        .read_to_end(&mut raw)
        .map_err(|e| Failure::Runtime(format!("cannot read the message from stdin: {e}")))?;
    let mut content = Vec::with_capacity(raw.len() + raw.len() / 40);
    for line in raw.split_inclusive(|&b| b == b'\n') {
        let text = line.strip_suffix(b"\n").unwrap_or(line);
        let text = text.strip_suffix(b"\r").unwrap_or(text);
        if !ignore_dots && text == b"." {
            break;
        }
        content.extend_from_slice(text);
        content.extend_from_slice(b"\r\n");
    }
    Ok(content)
}

/// The header section as (name, value) pairs with folded lines joined.
fn headers(content: &[u8]) -> Vec<(String, String)> {
    let text = String::from_utf8_lossy(&content[..header_section_len(content)]);
    let mut headers: Vec<(String, String)> = Vec::new();
    for line in text.split("\r\n").filter(|l| !l.is_empty()) {
        if line.starts_with([' ', '\t']) {
            if let Some((_, value)) = headers.last_mut() {
                value.push(' ');
                value.push_str(line.trim());
            }
        } else if let Some((name, value)) = line.split_once(':') {
            headers.push((name.trim().to_string(), value.trim().to_string()));
        }
    }
    headers
}

/// Addresses in an address-list header: `a@b, "Name" <c@d>, e@f (comment)`.
fn addresses_in(value: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut depth = 0;
    let mut quoted = false;
    let mut current = String::new();
    for c in value.chars().chain(std::iter::once(',')) {
        match c {
            '"' => quoted = !quoted,
            '(' if !quoted => depth += 1,
            ')' if !quoted && depth > 0 => depth -= 1,
            ',' if !quoted && depth == 0 => {
                let part = current.trim();
                let address = match (part.rfind('<'), part.rfind('>')) {
                    (Some(start), Some(end)) if start < end => &part[start + 1..end],
                    _ => part,
                };
                if !address.is_empty() {
                    found.push(address.trim().to_string());
                }
                current.clear();
            }
            c if depth == 0 => current.push(c),
            _ => {}
        }
    }
    found
}

/// Removes every `Bcc:` header (with its folded lines).
fn without_bcc(content: &[u8]) -> Vec<u8> {
    let end = header_section_len(content);
    let mut out = Vec::with_capacity(content.len());
    let mut dropping = false;
    for line in content[..end].split_inclusive(|&b| b == b'\n') {
        let continuation = line.starts_with(b" ") || line.starts_with(b"\t");
        if !continuation {
            dropping = line.len() >= 4 && line[..4].eq_ignore_ascii_case(b"bcc:");
        }
        if !dropping {
            out.extend_from_slice(line);
        }
    }
    out.extend_from_slice(&content[end..]);
    out
}

fn current_user() -> String {
    std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| "root".to_string())
}

pub fn run(config: &Config, args: &[String]) -> Result<(), Failure> {
    let request = parse_args(args)?;
    let raw = read_message(request.ignore_dots)?;
    let header_list = headers(&raw);
    let has = |name: &str| {
        header_list
            .iter()
            .any(|(n, _)| n.eq_ignore_ascii_case(name))
    };

    let local_domain = config
        .domains
        .local
        .first()
        .cloned()
        .unwrap_or_else(|| config.hostname.clone());
    let sender = match &request.sender {
        Some(sender) if sender.is_empty() || sender == "<>" => String::new(),
        Some(sender) => parse(sender.trim_matches(['<', '>']))?.to_string(),
        None => format!("{}@{local_domain}", current_user()),
    };

    let mut wanted: Vec<String> = request
        .recipients
        .iter()
        .flat_map(|r| addresses_in(r))
        .collect();
    if request.from_headers {
        for (name, value) in &header_list {
            if ["to", "cc", "bcc"]
                .iter()
                .any(|h| name.eq_ignore_ascii_case(h))
            {
                wanted.extend(addresses_in(value));
            }
        }
    }
    if wanted.is_empty() {
        return Err(Failure::Usage(
            "no recipients: name them, or use -t to take them from the headers".into(),
        ));
    }

    let accounts =
        queue::open_direct(&config.data_dir).map_err(|e| Failure::Runtime(e.to_string()))?;
    let recipients = route_recipients(config, &accounts, &wanted, &local_domain)?;

    let id = QueueId::generate();
    let now = SystemTime::now();
    let uid = std::fs::metadata("/proc/self")
        .map(|m| m.uid())
        .unwrap_or(0);
    let mut content = format!(
        "Received: by {} (petrel sendmail, uid {uid}) id {id}; {}\r\n",
        config.hostname,
        rfc5322_date(now)
    )
    .into_bytes();
    // What Postfix's cleanup adds to local submissions that lack them.
    if !has("From") {
        content.extend_from_slice(format!("From: <{sender}>\r\n").as_bytes());
    }
    if !has("Date") {
        content.extend_from_slice(format!("Date: {}\r\n", rfc5322_date(now)).as_bytes());
    }
    if !has("Message-ID") {
        content.extend_from_slice(format!("Message-ID: <{id}@{}>\r\n", config.hostname).as_bytes());
    }
    let raw_for_checks = raw.clone();
    let body = if request.from_headers {
        without_bcc(&raw)
    } else {
        raw
    };
    if header_list.is_empty() {
        // No headers at all: the body starts after our header block.
        content.extend_from_slice(b"\r\n");
    }
    content.extend_from_slice(&body);
    if content.len() as u64 > config.limits.max_message_size.bytes() {
        return Err(Failure::Runtime(format!(
            "message is larger than limits.max_message_size ({})",
            config.limits.max_message_size
        )));
    }
    // The same end-of-data checks as SMTP, on what the user gave us (our
    // own Received header not counted, as a session does not count it).
    let limits = ContentLimits {
        max_header_size: config.limits.max_header_size.bytes(),
        max_hops: config.limits.max_hops,
    };
    let local_mailboxes = recipients.iter().filter_map(|r| match &r.route {
        Route::Local { mailbox } => Some(mailbox.as_str()),
        _ => None,
    });
    if let Some(refusal) = content_refusal(
        &HeaderSummary::of(&raw_for_checks),
        &limits,
        local_mailboxes,
    ) {
        return Err(Failure::Runtime(format!(
            "message refused: {}",
            refusal.lines.join(" ")
        )));
    }

    // RFC 6531: UTF-8 in the envelope, or in the header section (RFC
    // 6532), needs SMTPUTF8 to travel on.
    let smtputf8 = !sender.is_ascii()
        || recipients.iter().any(|r| !r.address.is_ascii())
        || !content[..header_section_len(&content)].is_ascii();
    let message = NewMessage {
        id: id.clone(),
        sender: sender.clone(),
        recipients,
        eight_bit: !content.is_ascii(),
        smtputf8,
        content: Content::in_memory(content),
        client_ip: None,
        helo: None,
        auth_user: Some(current_user()),
        listener: "local".into(),
        kind: MessageKind::Normal,
        ret: None,
        envid: None,
    };
    let count = message.recipients.len();
    queue::insert_direct(&config.data_dir, &message)
        .map_err(|e| Failure::Runtime(e.to_string()))?;
    let uid = rustix::process::getuid().as_raw();
    let line = format!("{id}: uid={uid} from=<{sender}>, nrcpt={count} (local submission)");
    control::notify(&config.data_dir, &line);
    eprintln!("petrel: {line}");
    Ok(())
}

/// Routes each wanted recipient exactly as an SMTP session would for an
/// authenticated user: [`routing::resolve`], then [`policy`].
pub fn route_recipients(
    config: &Config,
    accounts: &rusqlite::Connection,
    wanted: &[String],
    local_domain: &str,
) -> Result<Vec<NewRecipient>, Failure> {
    let mut recipients: Vec<NewRecipient> = Vec::new();
    for text in wanted {
        // A bare user name means a local mailbox, as with any sendmail.
        let text = if text.contains('@') {
            text.clone()
        } else {
            format!("{text}@{local_domain}")
        };
        let address = parse(&text)?;
        let (resolution, mailbox_exists) = match routing::resolve(config, accounts, &address) {
            Ok(resolution) => (Some(resolution), true),
            Err(RouteError::NoSuchMailbox) => (None, false),
            Err(RouteError::Unavailable(error)) => {
                return Err(Failure::Runtime(format!(
                    "cannot look up {address}: {error}"
                )));
            }
            Err(error) => {
                return Err(Failure::Runtime(format!(
                    "{address}: alias expansion failed ({error:?}); fix [aliases]"
                )));
            }
        };
        // A local user is accountable, like an authenticated one.
        let facts = RecipientFacts {
            local_domain: resolution.as_ref().is_none_or(|r| r.local_domain),
            mailbox_exists,
            authenticated: true,
            trusted_network: false,
            domain: DomainStatus::NotChecked,
        };
        if let RecipientDecision::Refuse(reply) = policy::decide_recipient(&facts) {
            return Err(Failure::Runtime(format!(
                "{address}: {}",
                reply.lines.join(" ")
            )));
        }
        let Some(resolution) = resolution else {
            return Err(Failure::Runtime(format!(
                "{address}: no such local mailbox"
            )));
        };
        for skipped in &resolution.skipped {
            eprintln!(
                "petrel: warning: alias {address}: target {skipped} is not an account; skipped"
            );
        }
        for target in resolution.targets {
            if recipients
                .iter()
                .any(|r| r.route == target.route && r.address == target.address)
            {
                continue;
            }
            let original = address.to_string();
            recipients.push(NewRecipient {
                original: (original != target.address).then_some(original),
                address: target.address,
                route: target.route,
                domain: target.domain,
                notify: None,
                orcpt: None,
            });
        }
    }
    Ok(recipients)
}

fn parse(text: &str) -> Result<Address, Failure> {
    Address::parse(text).map_err(|e| Failure::Usage(format!("{text:?} is not an address: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn sendmail_options() {
        let request = parse_args(&args(&[
            "-t",
            "-oi",
            "-f",
            "me@example.com",
            "-F",
            "My Name",
            "you@example.org",
        ]))
        .unwrap();
        assert_eq!(
            request,
            Request {
                from_headers: true,
                ignore_dots: true,
                sender: Some("me@example.com".into()),
                recipients: vec!["you@example.org".into()],
            }
        );
        assert_eq!(
            parse_args(&args(&["-fme@example.com"]))
                .unwrap()
                .sender
                .as_deref(),
            Some("me@example.com")
        );
        assert!(
            parse_args(&args(&["-bs"])).is_err(),
            "SMTP on stdin is not offered"
        );
        assert!(parse_args(&args(&["-Z"])).is_err());
        assert!(parse_args(&args(&["-f"])).is_err());
    }

    #[test]
    fn address_lists() {
        assert_eq!(
            addresses_in("a@b.example, \"Doe, Jane\" <jane@c.example>, d@e.example (Dee, D.)"),
            vec!["a@b.example", "jane@c.example", "d@e.example"]
        );
        assert!(addresses_in("undisclosed-recipients:;").len() <= 1);
    }

    #[test]
    fn bcc_is_removed_with_its_folded_lines() {
        let content = b"To: a@b.example\r\nBcc: secret@c.example,\r\n other@d.example\r\nSubject: x\r\n\r\nBcc: stays in the body\r\n";
        assert_eq!(
            without_bcc(content),
            b"To: a@b.example\r\nSubject: x\r\n\r\nBcc: stays in the body\r\n"
        );
    }

    #[test]
    fn headers_are_unfolded() {
        let list = headers(b"Subject: one\r\n two\r\nTo: a@b.example\r\n\r\nbody\r\n");
        assert_eq!(list[0], ("Subject".to_string(), "one two".to_string()));
        assert_eq!(list[1].0, "To");
    }
}
