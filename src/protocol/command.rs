//! Parses one SMTP command line (without its CRLF) into a [`Command`].
//! Pure and total: any byte string yields a command or a [`ParseError`]
//! carrying the reply the client should get.

use super::address::{self, Address, AddressError, ReversePath};
use super::dsn::{self, Notify, Ret};
use super::reply::{self, Reply, Status};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Ehlo(String),
    Helo(String),
    Mail {
        from: ReversePath,
        params: MailParams,
    },
    Rcpt {
        to: ForwardPath,
        params: RcptParams,
    },
    Data,
    Rset,
    Noop,
    Quit,
    Vrfy,
    Expn,
    Help,
    StartTls,
    Auth {
        mechanism: String,
        initial_response: Option<String>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ForwardPath {
    /// `RCPT TO:<Postmaster>` without a domain (RFC 5321 4.1.1.3).
    Postmaster,
    Mailbox(Address),
}

impl std::fmt::Display for ForwardPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ForwardPath::Postmaster => f.write_str("Postmaster"),
            ForwardPath::Mailbox(address) => address.fmt(f),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BodyType {
    #[default]
    SevenBit,
    EightBitMime,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MailParams {
    /// RFC 1870 SIZE=: the client's estimate, checked before DATA.
    pub size: Option<u64>,
    pub body: BodyType,
    /// RFC 6531: the envelope or headers may contain UTF-8.
    pub smtputf8: bool,
    /// RFC 3461 RET: what a failure report returns.
    pub ret: Option<Ret>,
    /// RFC 3461 ENVID, decoded from xtext.
    pub envid: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RcptParams {
    /// RFC 3461 NOTIFY; `None` when not given.
    pub notify: Option<Notify>,
    /// RFC 3461 ORCPT as "addr-type;address", decoded.
    pub orcpt: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    pub status: Status,
    pub text: String,
}

impl ParseError {
    fn new(status: Status, text: impl Into<String>) -> Self {
        ParseError {
            status,
            text: text.into(),
        }
    }

    pub fn reply(&self) -> Reply {
        Reply::new(self.status, self.text.clone())
    }
}

pub fn parse_command(line: &[u8]) -> Result<Command, ParseError> {
    let line = std::str::from_utf8(line)
        .map_err(|_| ParseError::new(reply::SYNTAX_ERROR, "Command is not valid UTF-8"))?;
    if line.chars().any(|c| c.is_control() && c != '\t') {
        return Err(ParseError::new(
            reply::SYNTAX_ERROR,
            "Control characters are not allowed in commands",
        ));
    }
    let (verb, argument) = match line.split_once(' ') {
        Some((verb, rest)) => (verb, rest),
        None => (line, ""),
    };
    let no_argument = |command: Command| {
        if argument.trim().is_empty() {
            Ok(command)
        } else {
            Err(ParseError::new(
                reply::PARAMETER_SYNTAX,
                format!("{} takes no arguments", verb.to_ascii_uppercase()),
            ))
        }
    };
    match verb.to_ascii_uppercase().as_str() {
        "EHLO" => Ok(Command::Ehlo(parse_hello_name(argument)?)),
        "HELO" => Ok(Command::Helo(parse_hello_name(argument)?)),
        "MAIL" => parse_mail(argument),
        "RCPT" => parse_rcpt(argument),
        "DATA" => no_argument(Command::Data),
        "RSET" => no_argument(Command::Rset),
        "QUIT" => no_argument(Command::Quit),
        "STARTTLS" => no_argument(Command::StartTls),
        // NOOP and HELP may carry a string that the server ignores.
        "NOOP" => Ok(Command::Noop),
        "HELP" => Ok(Command::Help),
        "VRFY" => {
            if argument.trim().is_empty() {
                Err(ParseError::new(
                    reply::PARAMETER_SYNTAX,
                    "Syntax: VRFY <address>",
                ))
            } else {
                Ok(Command::Vrfy)
            }
        }
        "EXPN" => Ok(Command::Expn),
        "AUTH" => parse_auth(argument),
        "" => Err(ParseError::new(reply::SYNTAX_ERROR, "Empty command")),
        _ => Err(ParseError::new(
            reply::UNKNOWN_COMMAND,
            "Command not recognized",
        )),
    }
}

fn parse_hello_name(argument: &str) -> Result<String, ParseError> {
    // Clients send all kinds of names here (bare host names, underscores);
    // RFC 5321 4.1.4 forbids refusing mail over it, so take the first word.
    match argument.split_whitespace().next() {
        Some(name) => Ok(name.to_string()),
        None => Err(ParseError::new(
            reply::PARAMETER_SYNTAX,
            "Syntax: EHLO hostname",
        )),
    }
}

/// Splits `KEYWORD:<path> params` after the verb; tolerates one space
/// after the colon, which many clients send.
fn split_path<'a>(argument: &'a str, keyword: &str) -> Result<(&'a str, &'a str), ParseError> {
    let syntax = || {
        ParseError::new(
            reply::PARAMETER_SYNTAX,
            format!("Syntax: {keyword}:<address>"),
        )
    };
    let prefix = argument.get(..keyword.len() + 1).ok_or_else(syntax)?;
    if !prefix.eq_ignore_ascii_case(&format!("{keyword}:")) {
        return Err(syntax());
    }
    let rest = argument[keyword.len() + 1..].trim_start_matches(' ');
    if !rest.starts_with('<') {
        return Err(syntax());
    }
    let end = path_end(rest).ok_or_else(syntax)?;
    let (path, params) = rest.split_at(end + 1);
    if !params.is_empty() && !params.starts_with(' ') {
        return Err(syntax());
    }
    Ok((path, params.trim()))
}

/// Index of the `>` closing a path that starts with `<`, skipping quoted
/// local parts (which may contain `>`).
fn path_end(path: &str) -> Option<usize> {
    let mut in_quotes = false;
    let mut escaped = false;
    for (index, c) in path.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if in_quotes => escaped = true,
            '"' => in_quotes = !in_quotes,
            '>' if !in_quotes => return Some(index),
            _ => {}
        }
    }
    None
}

fn address_error(error: AddressError, sender: bool) -> ParseError {
    let status = if sender {
        reply::BAD_SENDER_ADDRESS_SYNTAX
    } else {
        reply::BAD_ADDRESS_SYNTAX
    };
    ParseError::new(status, format!("Bad address syntax: {error}"))
}

fn parse_mail(argument: &str) -> Result<Command, ParseError> {
    let (path, params_text) = split_path(argument, "FROM")?;
    let from = if path == "<>" {
        ReversePath::Null
    } else {
        ReversePath::Mailbox(address::parse_path(path).map_err(|e| address_error(e, true))?)
    };
    let mut params = MailParams::default();
    for param in params_text.split_whitespace() {
        let (key, value) = match param.split_once('=') {
            Some((key, value)) => (key, Some(value)),
            None => (param, None),
        };
        match (key.to_ascii_uppercase().as_str(), value) {
            ("SIZE", Some(value)) => {
                let size = value.parse::<u64>().map_err(|_| {
                    ParseError::new(reply::PARAMETER_SYNTAX, "SIZE takes a number of octets")
                })?;
                params.size = Some(size);
            }
            ("BODY", Some(value)) => {
                params.body = match value.to_ascii_uppercase().as_str() {
                    "7BIT" => BodyType::SevenBit,
                    "8BITMIME" => BodyType::EightBitMime,
                    _ => {
                        return Err(ParseError::new(
                            reply::UNKNOWN_PARAMETER,
                            "BODY must be 7BIT or 8BITMIME",
                        ));
                    }
                }
            }
            ("SMTPUTF8", None) => params.smtputf8 = true,
            ("RET", Some(value)) if params.ret.is_none() => {
                params.ret = Some(Ret::parse(value).map_err(dsn_error)?);
            }
            ("ENVID", Some(value)) if params.envid.is_none() => {
                if value.len() > dsn::MAX_ENVID {
                    return Err(dsn_error("ENVID is longer than 100 characters"));
                }
                params.envid = Some(dsn::xtext_decode(value).map_err(dsn_error)?);
            }
            // RFC 4954 5: AUTH=<> or AUTH=addr from a trusted relay; we
            // record our own authenticated identity instead, so it is ignored.
            ("AUTH", Some(_)) => {}
            _ => {
                return Err(ParseError::new(
                    reply::UNKNOWN_PARAMETER,
                    format!("Unsupported MAIL parameter {key}"),
                ));
            }
        }
    }
    Ok(Command::Mail { from, params })
}

fn parse_rcpt(argument: &str) -> Result<Command, ParseError> {
    let (path, params_text) = split_path(argument, "TO")?;
    let mut params = RcptParams::default();
    for param in params_text.split_whitespace() {
        let (key, value) = match param.split_once('=') {
            Some((key, value)) => (key, Some(value)),
            None => (param, None),
        };
        match (key.to_ascii_uppercase().as_str(), value) {
            ("NOTIFY", Some(value)) if params.notify.is_none() => {
                params.notify = Some(Notify::parse(value).map_err(dsn_error)?);
            }
            ("ORCPT", Some(value)) if params.orcpt.is_none() => {
                params.orcpt = Some(dsn::parse_orcpt(value).map_err(dsn_error)?);
            }
            _ => {
                return Err(ParseError::new(
                    reply::UNKNOWN_PARAMETER,
                    format!("Unsupported RCPT parameter {key}"),
                ));
            }
        }
    }
    let to = if path.eq_ignore_ascii_case("<postmaster>") {
        ForwardPath::Postmaster
    } else {
        ForwardPath::Mailbox(address::parse_path(path).map_err(|e| address_error(e, false))?)
    };
    Ok(Command::Rcpt { to, params })
}

fn dsn_error(why: &str) -> ParseError {
    ParseError::new(reply::PARAMETER_SYNTAX, why)
}

fn parse_auth(argument: &str) -> Result<Command, ParseError> {
    let mut words = argument.split_whitespace();
    let mechanism = words
        .next()
        .ok_or_else(|| ParseError::new(reply::PARAMETER_SYNTAX, "Syntax: AUTH mechanism"))?
        .to_ascii_uppercase();
    let initial_response = words.next().map(str::to_string);
    if words.next().is_some() {
        return Err(ParseError::new(
            reply::PARAMETER_SYNTAX,
            "Syntax: AUTH mechanism [initial-response]",
        ));
    }
    Ok(Command::Auth {
        mechanism,
        initial_response,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(line: &str) -> Result<Command, ParseError> {
        parse_command(line.as_bytes())
    }

    fn mailbox(text: &str) -> Address {
        Address::parse(text).unwrap()
    }

    #[test]
    fn simple_verbs_in_any_case() {
        assert_eq!(parse("DATA"), Ok(Command::Data));
        assert_eq!(parse("data"), Ok(Command::Data));
        assert_eq!(parse("RsEt"), Ok(Command::Rset));
        assert_eq!(parse("QUIT"), Ok(Command::Quit));
        assert_eq!(parse("NOOP whatever"), Ok(Command::Noop));
        assert_eq!(parse("STARTTLS"), Ok(Command::StartTls));
        assert_eq!(
            parse("EHLO client.example"),
            Ok(Command::Ehlo("client.example".into()))
        );
        assert_eq!(
            parse("HELO [192.0.2.1]"),
            Ok(Command::Helo("[192.0.2.1]".into()))
        );
    }

    #[test]
    fn mail_from_with_parameters() {
        assert_eq!(
            parse("MAIL FROM:<a@example.org> SIZE=1000 BODY=8BITMIME SMTPUTF8"),
            Ok(Command::Mail {
                from: ReversePath::Mailbox(mailbox("a@example.org")),
                params: MailParams {
                    size: Some(1000),
                    body: BodyType::EightBitMime,
                    smtputf8: true,
                    ..MailParams::default()
                },
            })
        );
        assert_eq!(
            parse("MAIL FROM:<a@example.org> RET=hdrs ENVID=QQ+2B314"),
            Ok(Command::Mail {
                from: ReversePath::Mailbox(mailbox("a@example.org")),
                params: MailParams {
                    ret: Some(Ret::Headers),
                    envid: Some("QQ+314".into()),
                    ..MailParams::default()
                },
            })
        );
        assert_eq!(
            parse("mail from: <>"),
            Ok(Command::Mail {
                from: ReversePath::Null,
                params: MailParams::default(),
            })
        );
        assert_eq!(
            parse("MAIL FROM:<\"odd > name\"@example.org>"),
            Ok(Command::Mail {
                from: ReversePath::Mailbox(mailbox("\"odd > name\"@example.org")),
                params: MailParams::default(),
            })
        );
    }

    #[test]
    fn rcpt_to() {
        assert_eq!(
            parse("RCPT TO:<b@example.com>"),
            Ok(Command::Rcpt {
                to: ForwardPath::Mailbox(mailbox("b@example.com")),
                params: RcptParams::default(),
            })
        );
        assert_eq!(
            parse("RCPT TO:<Postmaster>"),
            Ok(Command::Rcpt {
                to: ForwardPath::Postmaster,
                params: RcptParams::default(),
            })
        );
        assert_eq!(
            parse("RCPT TO:<b@example.com> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;B+40example.com"),
            Ok(Command::Rcpt {
                to: ForwardPath::Mailbox(mailbox("b@example.com")),
                params: RcptParams {
                    notify: Some(Notify {
                        success: true,
                        failure: true,
                        delay: false
                    }),
                    orcpt: Some("rfc822;B@example.com".into()),
                },
            })
        );
    }

    #[test]
    fn errors_carry_the_right_codes() {
        let code = |line: &str| parse(line).unwrap_err().status;
        assert_eq!(code("FOO"), reply::UNKNOWN_COMMAND);
        assert_eq!(code(""), reply::SYNTAX_ERROR);
        assert_eq!(code("MAIL <a@b.c>"), reply::PARAMETER_SYNTAX);
        assert_eq!(code("MAIL FROM:a@b.c"), reply::PARAMETER_SYNTAX);
        assert_eq!(code("MAIL FROM:<a@b.c"), reply::PARAMETER_SYNTAX);
        assert_eq!(code("MAIL FROM:<a@b.c>junk"), reply::PARAMETER_SYNTAX);
        assert_eq!(
            code("MAIL FROM:<a..b@c.d>"),
            reply::BAD_SENDER_ADDRESS_SYNTAX
        );
        assert_eq!(code("MAIL FROM:<a@b.c> SIZE=big"), reply::PARAMETER_SYNTAX);
        assert_eq!(code("MAIL FROM:<a@b.c> RET=ALL"), reply::PARAMETER_SYNTAX);
        assert_eq!(
            code("MAIL FROM:<a@b.c> RET=FULL RET=HDRS"),
            reply::UNKNOWN_PARAMETER
        );
        assert_eq!(
            code(&format!("MAIL FROM:<a@b.c> ENVID={}", "x".repeat(101))),
            reply::PARAMETER_SYNTAX
        );
        assert_eq!(
            code("MAIL FROM:<a@b.c> BODY=BINARYMIME"),
            reply::UNKNOWN_PARAMETER
        );
        assert_eq!(code("RCPT TO:<nobody>"), reply::BAD_ADDRESS_SYNTAX);
        assert_eq!(
            code("RCPT TO:<a@b.c> NOTIFY=NEVER,DELAY"),
            reply::PARAMETER_SYNTAX
        );
        assert_eq!(code("RCPT TO:<a@b.c> FOO=BAR"), reply::UNKNOWN_PARAMETER);
        assert_eq!(code("DATA now"), reply::PARAMETER_SYNTAX);
        assert_eq!(code("EHLO"), reply::PARAMETER_SYNTAX);
        assert_eq!(code("VRFY"), reply::PARAMETER_SYNTAX);
        assert_eq!(code("AUTH"), reply::PARAMETER_SYNTAX);
        assert_eq!(
            parse_command(b"MAIL FROM:<\xff@b.c>").unwrap_err().status,
            reply::SYNTAX_ERROR
        );
        assert_eq!(code("NOOP \x01"), reply::SYNTAX_ERROR);
    }

    #[test]
    fn auth_with_and_without_initial_response() {
        assert_eq!(
            parse("AUTH plain AGFsaWNlAHNlY3JldA=="),
            Ok(Command::Auth {
                mechanism: "PLAIN".into(),
                initial_response: Some("AGFsaWNlAHNlY3JldA==".into())
            })
        );
        assert_eq!(
            parse("AUTH LOGIN"),
            Ok(Command::Auth {
                mechanism: "LOGIN".into(),
                initial_response: None
            })
        );
    }
}
