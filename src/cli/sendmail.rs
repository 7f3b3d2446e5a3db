//! `petrel sendmail`: the sendmail interface that cron, PHP's mail(),
//! Symfony and friends expect, also when the binary is invoked as
//! `sendmail`, `mailq` or `newaliases`. It never touches the queue
//! database: the message goes to the running server over the local socket
//! (as SMTP, so the server routes and checks it as any submission, knowing
//! the user from the kernel), or, when no server runs, into the maildrop,
//! which the server empties when it starts. Any local user can send mail.

use std::io::{self, BufRead as _, BufReader, Read as _, Write as _};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, SystemTime};

use super::{Failure, say};
use crate::config::Config;
use crate::protocol::address::Address;
use crate::protocol::client::{DotStuffer, ParseStep, ReplyParser, ServerReply};
use crate::protocol::data::header_section_len;
use crate::queue::QueueId;
use crate::server::local;
use crate::store::data_dir;
use crate::timefmt::rfc5322_date;

/// What the sendmail command line asked for.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SendmailRequest {
    pub mode: SendmailMode,
    /// -t: recipients from To, Cc and Bcc (Bcc is then removed).
    pub from_headers: bool,
    /// -i / -oi: a line with a single dot does not end the message.
    pub ignore_dots: bool,
    /// -f: the envelope sender.
    pub sender: Option<String>,
    /// -F: the sender's full name, for a From: header we add.
    pub full_name: Option<String>,
    pub recipients: Vec<String>,
    /// -v: say where the message went. Silent otherwise, as every
    /// sendmail is: cron mails a job's output to its owner.
    pub verbose: bool,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub enum SendmailMode {
    /// -bm: deliver a message (the default).
    #[default]
    Submit,
    /// -bs: SMTP on standard input and output.
    Smtp,
    /// -bp, or invoked as `mailq`: list the queue.
    ListQueue,
    /// -q, -qR..., -qS...: retry the queue now.
    RunQueue,
    /// -bi, or invoked as `newaliases`: check the aliases.
    Aliases,
}

/// Parses sendmail's options; the ones that make no sense here (-o
/// settings, -B, -N, -odi ...) are accepted and ignored, as other
/// sendmail replacements do, so existing scripts keep working.
pub fn parse_args(args: &[String]) -> Result<SendmailRequest, Failure> {
    let mut request = SendmailRequest::default();
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
            "-F" => {
                let name = args
                    .next()
                    .ok_or_else(|| Failure::Usage("-F needs a name".into()))?;
                request.full_name = Some(name.clone());
            }
            "-O" | "-o" | "-B" | "-N" | "-R" | "-V" | "-X" | "-L" => {
                args.next();
            }
            flag if flag.starts_with("-f") && flag.len() > 2 => {
                request.sender = Some(flag[2..].to_string())
            }
            flag if flag.starts_with("-F") && flag.len() > 2 => {
                request.full_name = Some(flag[2..].to_string())
            }
            flag if flag.starts_with("-o") || flag.starts_with("-B") => {}
            "-v" => request.verbose = true,
            "-bm" | "-U" | "-G" | "-n" => {}
            "-bs" => request.mode = SendmailMode::Smtp,
            "-bp" => request.mode = SendmailMode::ListQueue,
            "-bi" => request.mode = SendmailMode::Aliases,
            flag if flag.starts_with("-q") => request.mode = SendmailMode::RunQueue,
            flag if flag.starts_with("-b") => {
                return Err(Failure::Usage(format!(
                    "sendmail mode {flag} is not supported (petrel has -bm, -bs, -bp, -bi, -q)"
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

/// Ends the header section with a blank line where it ends in fact: at
/// the first line that is not a header field (`echo "disk usage: 42%" |
/// sendmail root` is all body, "disk usage" being no field name), as
/// Postfix's cleanup does. Without it the added headers and the text
/// would run together.
fn with_blank_line_after_headers(raw: Vec<u8>) -> Vec<u8> {
    let mut offset = 0;
    let mut seen_field = false;
    for line in raw.split_inclusive(|&b| b == b'\n') {
        let text = line.strip_suffix(b"\r\n").unwrap_or(line);
        if text.is_empty() {
            return raw;
        }
        let continuation = seen_field && matches!(text[0], b' ' | b'\t');
        if !continuation && !is_header_field(text) {
            break;
        }
        seen_field = true;
        offset += line.len();
    }
    let mut out = Vec::with_capacity(raw.len() + 2);
    out.extend_from_slice(&raw[..offset]);
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(&raw[offset..]);
    out
}

/// RFC 5322 §2.2: a field name is printable ASCII but ':', then ':'.
fn is_header_field(line: &[u8]) -> bool {
    match line.iter().position(|&b| b == b':') {
        Some(colon) if colon > 0 => line[..colon].iter().all(|&b| (33..=126).contains(&b)),
        _ => false,
    }
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

/// What the local socket (or the maildrop) needs: the SMTP dialogue.
struct Submission {
    sender: String,
    recipients: Vec<String>,
    content: Vec<u8>,
    smtputf8: bool,
    eight_bit: bool,
}

pub fn run(config: &Config, args: &[String], invoked_as: &str) -> Result<(), Failure> {
    let mut request = parse_args(args)?;
    match invoked_as {
        "mailq" => request.mode = SendmailMode::ListQueue,
        "newaliases" => request.mode = SendmailMode::Aliases,
        _ => {}
    }
    match request.mode {
        SendmailMode::Submit => submit(config, &request),
        SendmailMode::Smtp => smtp_on_stdio(config),
        SendmailMode::ListQueue => super::queue::run_as(
            config,
            super::queue::QueueCommand::List {
                limit: 100,
                after: None,
            },
            if invoked_as == "mailq" {
                "mailq"
            } else {
                "sendmail -bp"
            },
        ),
        SendmailMode::RunQueue => super::queue::run_as(
            config,
            super::queue::QueueCommand::Retry {
                id: None,
                all: true,
            },
            "sendmail -q",
        ),
        SendmailMode::Aliases => check_aliases(config),
    }
}

/// `newaliases`: aliases live in the config, so this checks them the way
/// the server will use them, then has the running server read them again.
fn check_aliases(config: &Config) -> Result<(), Failure> {
    // It reads the accounts and talks to the server's control socket:
    // as anyone else it would report aliases to "missing" accounts and
    // no server.
    super::needs_server_rights(config, "newaliases")?;
    let findings = super::check::check(config);
    let problems: Vec<&String> = findings
        .warnings
        .iter()
        .filter(|w| w.contains("alias") || w.contains("postmaster"))
        .collect();
    for problem in &problems {
        eprintln!("petrel: warning: {problem}");
    }
    say!(
        "{} aliases checked, {} problems",
        config.aliases.len(),
        problems.len()
    );
    match crate::server::control::reload_aliases(&config.data_dir) {
        Some(Ok(count)) => {
            say!("the running server now routes with these aliases ({count})");
            Ok(())
        }
        Some(Err(why)) => Err(Failure::Runtime(format!(
            "the running server did not reload its aliases: {why}"
        ))),
        None => {
            say!("no running server was reached; it reads them when it starts");
            Ok(())
        }
    }
}

/// Builds the message and the envelope from the command line and stdin.
fn prepare(config: &Config, request: &SendmailRequest) -> Result<Submission, Failure> {
    let raw = with_blank_line_after_headers(read_message(request.ignore_dots)?);
    let header_list = headers(&raw);
    let has = |name: &str| {
        header_list
            .iter()
            .any(|(n, _)| n.eq_ignore_ascii_case(name))
    };
    let me = own_identity(config);
    let sender = match &request.sender {
        Some(sender) if sender.is_empty() || sender == "<>" => String::new(),
        Some(sender) => parse(sender.trim_matches(['<', '>']))?.to_string(),
        None => me.address.clone(),
    };
    let recipients = recipients_of(request, &header_list, &me.address)?;
    let mut content = missing_fields(config, request, &sender, has);
    let body = if request.from_headers {
        without_bcc(&raw)
    } else {
        raw
    };
    content.extend_from_slice(&body);
    // RFC 6531: UTF-8 in the envelope, or in the header section (RFC
    // 6532), needs SMTPUTF8 to travel on.
    let smtputf8 = !sender.is_ascii()
        || recipients.iter().any(|r| !r.is_ascii())
        || !content[..header_section_len(&content)].is_ascii();
    Ok(Submission {
        eight_bit: !content.is_ascii(),
        sender,
        recipients,
        content,
        smtputf8,
    })
}

/// The recipients named on the command line, and with -t in the To:,
/// Cc: and Bcc: fields; a bare user name is a mailbox in `own_address`'s
/// domain, as with any sendmail.
fn recipients_of(
    request: &SendmailRequest,
    header_list: &[(String, String)],
    own_address: &str,
) -> Result<Vec<String>, Failure> {
    let mut recipients: Vec<String> = request
        .recipients
        .iter()
        .flat_map(|r| addresses_in(r))
        .collect();
    if request.from_headers {
        for (name, value) in header_list {
            if ["to", "cc", "bcc"]
                .iter()
                .any(|h| name.eq_ignore_ascii_case(h))
            {
                recipients.extend(addresses_in(value));
            }
        }
    }
    if recipients.is_empty() {
        return Err(Failure::Usage(if request.from_headers {
            "no recipients: the message has no To:, Cc: or Bcc: field, and none were named".into()
        } else {
            "no recipients: name them, or use -t to take them from the headers".into()
        }));
    }
    let domain = own_address
        .rsplit_once('@')
        .map(|(_, d)| d.to_string())
        .unwrap_or_default();
    let recipients: Vec<String> = recipients
        .into_iter()
        .map(|r| {
            if r.contains('@') {
                r
            } else {
                format!("{r}@{domain}")
            }
        })
        .collect();
    for recipient in &recipients {
        parse(recipient)?;
    }
    Ok(recipients)
}

/// What Postfix's cleanup adds to local submissions that lack them: From,
/// Date, Message-ID.
fn missing_fields(
    config: &Config,
    request: &SendmailRequest,
    sender: &str,
    has: impl Fn(&str) -> bool,
) -> Vec<u8> {
    let mut fields = String::new();
    if !has("From") {
        match &request.full_name {
            Some(name) => fields.push_str(&format!("From: {} <{sender}>\r\n", quote_phrase(name))),
            None => fields.push_str(&format!("From: <{sender}>\r\n")),
        }
    }
    if !has("Date") {
        fields.push_str(&format!("Date: {}\r\n", rfc5322_date(SystemTime::now())));
    }
    if !has("Message-ID") {
        let id = QueueId::generate();
        fields.push_str(&format!("Message-ID: <{id}@{}>\r\n", config.hostname));
    }
    fields.into_bytes()
}

/// A phrase for a From: header: quoted unless it is plain words. Control
/// characters become spaces: a line break in `-F` would start a header
/// field of the caller's choosing (and petrel's DKIM signature would
/// cover it).
fn quote_phrase(name: &str) -> String {
    let name: String = name
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let name = name.trim();
    let plain = name
        .chars()
        .all(|c| c.is_alphanumeric() || c == ' ' || "!#$%&'*+-/=?^_`{|}~".contains(c));
    if plain {
        name.to_string()
    } else {
        format!("\"{}\"", name.replace(['\\', '"'], ""))
    }
}

/// Who the kernel says we are, as the server will see it.
fn own_identity(config: &Config) -> crate::protocol::session::LocalUser {
    local::local_user(
        config,
        rustix::process::getuid().as_raw(),
        rustix::process::getgid().as_raw(),
    )
}

fn submit(config: &Config, request: &SendmailRequest) -> Result<(), Failure> {
    let submission = prepare(config, request)?;
    let dialogue = dialogue(&submission);
    match UnixStream::connect(data_dir::submit_socket(&config.data_dir)) {
        Ok(stream) => {
            let queued = converse(stream, &submission)?;
            if request.verbose {
                eprintln!("petrel: {queued}");
            }
            Ok(())
        }
        Err(error)
            if matches!(
                error.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
            ) =>
        {
            drop_off(config, &dialogue, request.verbose)
        }
        Err(error) => Err(Failure::Temporary(format!(
            "cannot reach the petrel server at {}: {error}; the message was not sent",
            data_dir::submit_socket(&config.data_dir).display()
        ))),
    }
}

/// The SMTP commands (and the dot-stuffed message) for a submission,
/// exactly as they go over the socket: also the maildrop file's format.
fn dialogue(submission: &Submission) -> Vec<u8> {
    let mut out = Vec::with_capacity(submission.content.len() + 512);
    out.extend_from_slice(b"EHLO localhost\r\n");
    out.extend_from_slice(mail_command(submission).as_bytes());
    for recipient in &submission.recipients {
        out.extend_from_slice(format!("RCPT TO:<{recipient}>\r\n").as_bytes());
    }
    out.extend_from_slice(b"DATA\r\n");
    let mut stuffer = DotStuffer::default();
    stuffer.push(&submission.content, &mut out);
    stuffer.finish(&mut out);
    out.extend_from_slice(b".\r\nQUIT\r\n");
    out
}

fn mail_command(submission: &Submission) -> String {
    let mut mail = format!("MAIL FROM:<{}>", submission.sender);
    if submission.eight_bit {
        mail.push_str(" BODY=8BITMIME");
    }
    if submission.smtputf8 {
        mail.push_str(" SMTPUTF8");
    }
    mail.push_str("\r\n");
    mail
}

/// Talks to the server: a refused recipient is an error (exit 1, or 75
/// when the refusal is temporary), as the caller must learn of it.
/// Returns the server's final reply ("2.0.0 OK queued as ...").
fn converse(stream: UnixStream, submission: &Submission) -> Result<String, Failure> {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(300)));
    let mut writer = stream
        .try_clone()
        .map_err(|e| Failure::Temporary(format!("local socket: {e}")))?;
    let mut reader = BufReader::new(stream);
    let mut send = |bytes: &[u8]| {
        writer
            .write_all(bytes)
            .map_err(|e| Failure::Temporary(format!("local socket: {e}; the message was not sent")))
    };
    let expect = |reader: &mut BufReader<UnixStream>, what: &str| -> Result<ServerReply, Failure> {
        let reply = read_reply(reader)?;
        if reply.is_positive() {
            return Ok(reply);
        }
        let text = format!("{what}: {reply}");
        Err(if reply.is_transient() {
            Failure::Temporary(text)
        } else {
            Failure::Runtime(text)
        })
    };
    expect(&mut reader, "greeting")?;
    send(b"EHLO localhost\r\n")?;
    expect(&mut reader, "EHLO")?;
    send(mail_command(submission).as_bytes())?;
    expect(&mut reader, "MAIL FROM")?;
    for recipient in &submission.recipients {
        send(format!("RCPT TO:<{recipient}>\r\n").as_bytes())?;
        expect(&mut reader, &format!("<{recipient}>"))?;
    }
    send(b"DATA\r\n")?;
    expect(&mut reader, "DATA")?;
    let mut body = Vec::with_capacity(submission.content.len() + 64);
    let mut stuffer = DotStuffer::default();
    stuffer.push(&submission.content, &mut body);
    stuffer.finish(&mut body);
    body.extend_from_slice(b".\r\n");
    send(&body)?;
    let queued = expect(&mut reader, "message")?;
    if send(b"QUIT\r\n").is_ok() {
        let _ = read_reply(&mut reader);
    }
    Ok(queued.lines.join(" "))
}

fn read_reply(reader: &mut BufReader<UnixStream>) -> Result<ServerReply, Failure> {
    let mut parser = ReplyParser::default();
    loop {
        let mut line = Vec::new();
        let read = reader
            .by_ref()
            .take(4096)
            .read_until(b'\n', &mut line)
            .map_err(|e| {
                Failure::Temporary(format!("local socket: {e}; the message was not sent"))
            })?;
        if read == 0 {
            return Err(Failure::Temporary(
                "the server closed the local socket; the message was not sent".into(),
            ));
        }
        let line = line.strip_suffix(b"\n").unwrap_or(&line);
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        match parser.line(line).map_err(Failure::Temporary)? {
            ParseStep::More => {}
            ParseStep::Done(reply) => return Ok(reply),
        }
    }
}

/// No server runs: the dialogue goes into the maildrop, written under a
/// dot name and renamed when complete, so the server never reads half.
/// The maildrop is reached from `data_dir` one folder at a time, never
/// through a symbolic link: run by root, sendmail must not be steered into
/// writing somewhere else by whoever can change `data_dir`.
fn drop_off(config: &Config, dialogue: &[u8], verbose: bool) -> Result<(), Failure> {
    use std::os::unix::fs::PermissionsExt as _;
    let relative = Path::new(data_dir::PUBLIC_DIR).join(data_dir::MAILDROP);
    let name = format!(
        "{:016x}{:016x}",
        crate::dns::random_u64(),
        crate::dns::random_u64()
    );
    let temporary = format!(".{name}");
    // The maildrop is on the queue's disk: it keeps the same floor free.
    let floor = config.queue.min_free_space.bytes();
    if let Ok(free) = data_dir::free_space(&config.data_dir)
        && free < floor.saturating_add(dialogue.len() as u64)
    {
        return Err(Failure::Temporary(format!(
            "the petrel server is not running, and the maildrop's disk has only {} MiB free \
             (queue.min_free_space is {}); the message was not sent",
            free / (1024 * 1024),
            config.queue.min_free_space
        )));
    }
    let written =
        crate::safe_fs::Dir::open_beneath(&config.data_dir, &relative).and_then(|maildrop| {
            let result = (|| -> io::Result<()> {
                // Readable by the server's user whatever our umask (the
                // maildrop cannot be listed, and the name is random); owned
                // by us, which is how the server knows who sent it.
                let mut file = maildrop.create_new_file(temporary.as_ref(), 0o644)?;
                file.set_permissions(std::fs::Permissions::from_mode(0o644))?;
                file.write_all(dialogue)?;
                file.sync_all()?;
                maildrop.rename(temporary.as_ref(), name.as_ref())
            })();
            if result.is_err() {
                let _ = maildrop.remove_file(temporary.as_ref());
            }
            result
        });
    if let Err(error) = written {
        return Err(Failure::Temporary(format!(
            "the petrel server is not running and the maildrop {} cannot take the message \
             ({error}); the message was not sent",
            config.data_dir.join(&relative).display()
        )));
    }
    // Silent on success (cron mails any output back); -v tells.
    if verbose {
        eprintln!(
            "petrel: the server is not running; the message waits in the maildrop and is \
             sent when it starts"
        );
    }
    Ok(())
}

/// `sendmail -bs`: SMTP on standard input and output, passed through to
/// the server's local socket (what Symfony and Laravel use).
fn smtp_on_stdio(config: &Config) -> Result<(), Failure> {
    let stream = match UnixStream::connect(data_dir::submit_socket(&config.data_dir)) {
        Ok(stream) => stream,
        Err(error) => {
            let mut out = io::stdout().lock();
            let _ =
                out.write_all(b"421 4.3.0 The petrel server is not running, try again later\r\n");
            let _ = out.flush();
            return Err(Failure::Temporary(format!(
                "cannot reach the petrel server at {}: {error}",
                data_dir::submit_socket(&config.data_dir).display()
            )));
        }
    };
    let mut to_server = stream
        .try_clone()
        .map_err(|e| Failure::Temporary(format!("local socket: {e}")))?;
    let forward = std::thread::spawn(move || {
        let _ = io::copy(&mut io::stdin().lock(), &mut to_server);
        let _ = to_server.shutdown(std::net::Shutdown::Write);
    });
    let mut from_server = stream;
    let mut stdout = io::stdout().lock();
    let mut buf = [0u8; 16 * 1024];
    loop {
        match from_server.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if stdout
                    .write_all(&buf[..n])
                    .and_then(|()| stdout.flush())
                    .is_err()
                {
                    break;
                }
            }
        }
    }
    drop(forward);
    Ok(())
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
            SendmailRequest {
                mode: SendmailMode::Submit,
                from_headers: true,
                ignore_dots: true,
                sender: Some("me@example.com".into()),
                full_name: Some("My Name".into()),
                recipients: vec!["you@example.org".into()],
                verbose: false,
            }
        );
        assert!(
            parse_args(&args(&["-v", "you@example.org"]))
                .unwrap()
                .verbose
        );
        assert_eq!(
            parse_args(&args(&["-fme@example.com"]))
                .unwrap()
                .sender
                .as_deref(),
            Some("me@example.com")
        );
        assert_eq!(
            parse_args(&args(&["-bs"])).unwrap().mode,
            SendmailMode::Smtp
        );
        assert_eq!(
            parse_args(&args(&["-bp"])).unwrap().mode,
            SendmailMode::ListQueue
        );
        assert_eq!(
            parse_args(&args(&["-q"])).unwrap().mode,
            SendmailMode::RunQueue
        );
        assert_eq!(
            parse_args(&args(&["-qR", "x"])).unwrap().mode,
            SendmailMode::RunQueue
        );
        assert!(parse_args(&args(&["-bd"])).is_err(), "no daemon mode");
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
    fn the_header_section_ends_at_the_first_line_that_is_no_field() {
        let blank = |raw: &[u8]| with_blank_line_after_headers(raw.to_vec());
        assert_eq!(blank(b"disk usage: 42%\r\n"), b"\r\ndisk usage: 42%\r\n");
        assert_eq!(blank(b"hello\r\n"), b"\r\nhello\r\n");
        assert_eq!(blank(b""), b"\r\n");
        assert_eq!(
            blank(b"Subject: x\r\n folded\r\nhello\r\n"),
            b"Subject: x\r\n folded\r\n\r\nhello\r\n"
        );
        let complete = b"Subject: x\r\n\r\nbody: text\r\n";
        assert_eq!(blank(complete), complete);
        assert_eq!(blank(b" indented\r\n"), b"\r\n indented\r\n");
    }

    #[test]
    fn headers_are_unfolded() {
        let list = headers(b"Subject: one\r\n two\r\nTo: a@b.example\r\n\r\nbody\r\n");
        assert_eq!(list[0], ("Subject".to_string(), "one two".to_string()));
        assert_eq!(list[1].0, "To");
    }
}
