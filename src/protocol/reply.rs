//! SMTP replies: the basic code (RFC 5321 4.2) paired with its enhanced
//! status code (RFC 3463, RFC 2034) as named constants, so every reply code
//! the server can send is listed here once.

/// A reply code with its enhanced status code, if it carries one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Status {
    pub code: u16,
    pub enhanced: Option<&'static str>,
}

pub(crate) const fn plain(code: u16) -> Status {
    Status {
        code,
        enhanced: None,
    }
}

pub(crate) const fn enhanced(code: u16, enhanced: &'static str) -> Status {
    Status {
        code,
        enhanced: Some(enhanced),
    }
}

// Greeting and EHLO/HELO replies carry no enhanced code (RFC 2034 section 3).
pub const SERVICE_READY: Status = plain(220);
pub const HELLO_OK: Status = plain(250);

pub const CLOSING: Status = enhanced(221, "2.0.0");
pub const AUTH_SUCCEEDED: Status = enhanced(235, "2.7.0");
pub const OK: Status = enhanced(250, "2.0.0");
pub const SENDER_OK: Status = enhanced(250, "2.1.0");
pub const RECIPIENT_OK: Status = enhanced(250, "2.1.5");
pub const MESSAGE_QUEUED: Status = enhanced(250, "2.0.0");
pub const CANNOT_VRFY: Status = enhanced(252, "2.5.0");
pub const HELP: Status = enhanced(214, "2.0.0");
pub const READY_FOR_TLS: Status = enhanced(220, "2.0.0");
pub const AUTH_CHALLENGE: Status = plain(334);
pub const START_DATA: Status = plain(354);

pub const TOO_MANY_CONNECTIONS_FROM_YOU: Status = enhanced(421, "4.7.0");
pub const TOO_BUSY: Status = enhanced(421, "4.3.2");
pub const SHUTTING_DOWN: Status = enhanced(421, "4.3.2");
pub const TIMEOUT: Status = enhanced(421, "4.4.2");
pub const TOO_MANY_ERRORS: Status = enhanced(421, "4.7.0");
pub const AUTH_LOCKED_OUT: Status = enhanced(421, "4.7.0");
pub const LOCAL_ERROR: Status = enhanced(451, "4.3.0");
pub const DNS_TEMPORARY_FAILURE: Status = enhanced(451, "4.4.3");
pub const TOO_MANY_RECIPIENTS: Status = enhanced(452, "4.5.3");
pub const STORAGE_FULL: Status = enhanced(452, "4.3.1");
pub const TLS_NOT_AVAILABLE: Status = enhanced(454, "4.7.0");
pub const AUTH_TEMPORARY_FAILURE: Status = enhanced(454, "4.7.0");

pub const SYNTAX_ERROR: Status = enhanced(500, "5.5.2");
pub const UNKNOWN_COMMAND: Status = enhanced(500, "5.5.1");
pub const LINE_TOO_LONG: Status = enhanced(500, "5.5.2");
pub const PARAMETER_SYNTAX: Status = enhanced(501, "5.5.4");
pub const BAD_ADDRESS_SYNTAX: Status = enhanced(501, "5.1.3");
pub const BAD_SENDER_ADDRESS_SYNTAX: Status = enhanced(501, "5.1.7");
pub const AUTH_MALFORMED: Status = enhanced(501, "5.5.2");
pub const AUTH_CANCELLED: Status = enhanced(501, "5.0.0");
pub const NOT_IMPLEMENTED: Status = enhanced(502, "5.5.1");
pub const BAD_SEQUENCE: Status = enhanced(503, "5.5.1");
pub const UNKNOWN_AUTH_MECHANISM: Status = enhanced(504, "5.5.4");
pub const AUTH_REQUIRED: Status = enhanced(530, "5.7.0");
pub const ENCRYPTION_REQUIRED_FOR_AUTH: Status = enhanced(538, "5.7.11");
pub const AUTH_INVALID_CREDENTIALS: Status = enhanced(535, "5.7.8");
pub const NO_SUCH_USER: Status = enhanced(550, "5.1.1");
pub const NO_SUCH_DOMAIN: Status = enhanced(550, "5.1.2");
pub const MESSAGE_TOO_BIG: Status = enhanced(552, "5.3.4");
pub const HEADER_TOO_BIG: Status = enhanced(552, "5.3.4");
pub const TOO_MANY_HOPS: Status = enhanced(554, "5.4.6");
pub const MAIL_LOOP: Status = enhanced(554, "5.4.6");
pub const ALIAS_LOOP: Status = enhanced(550, "5.4.6");
pub const SENDER_NOT_OWNED: Status = enhanced(553, "5.7.1");
pub const SENDER_DOMAIN_UNKNOWN: Status = enhanced(553, "5.1.8");
pub const NON_ASCII_WITHOUT_SMTPUTF8: Status = enhanced(553, "5.6.7");
pub const RELAY_DENIED: Status = enhanced(554, "5.7.1");
pub const BAD_MESSAGE_DATA: Status = enhanced(554, "5.6.0");
pub const TRANSACTION_FAILED: Status = enhanced(554, "5.3.0");
pub const UNKNOWN_PARAMETER: Status = enhanced(555, "5.5.4");
pub const DOMAIN_ACCEPTS_NO_MAIL: Status = enhanced(556, "5.1.10");
pub const DESTINATION_NOT_ALLOWED: Status = enhanced(550, "5.4.4");
/// The gate before the session: a DNS blocklist, or a client that talked
/// before the greeting (said before any session, as postscreen does).
pub const CLIENT_REFUSED: Status = enhanced(554, "5.7.1");
/// A content filter (milter) refused the message, or could not be asked.
pub const MILTER_REFUSED: Status = enhanced(550, "5.7.1");
pub const MILTER_FAILED: Status = enhanced(554, "5.7.1");
pub const MILTER_UNAVAILABLE: Status = enhanced(451, "4.7.1");
/// RFC 7372 / RFC 7489 6.7: the From domain's DMARC policy says reject.
pub const DMARC_REJECT: Status = enhanced(550, "5.7.1");

/// One reply, possibly multi-line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub status: Status,
    pub lines: Vec<String>,
}

impl Reply {
    pub fn new(status: Status, text: impl Into<String>) -> Reply {
        Reply {
            status,
            lines: vec![text.into()],
        }
    }

    pub fn multiline(status: Status, lines: Vec<String>) -> Reply {
        Reply { status, lines }
    }

    pub fn code(&self) -> u16 {
        self.status.code
    }

    pub fn is_positive(&self) -> bool {
        self.status.code < 400
    }

    /// Wire form, CRLF-terminated; every line carries the enhanced code.
    pub fn to_wire(&self) -> String {
        let mut out = Vec::new();
        self.write_wire(&mut out);
        // Only ASCII was put in place of the text's line breaks.
        String::from_utf8(out)
            .unwrap_or_else(|error| String::from_utf8_lossy(error.as_bytes()).into_owned())
    }

    /// Appends the wire form to `out`: a session writes its replies
    /// straight into its output buffer, with no string per reply.
    pub fn write_wire(&self, out: &mut Vec<u8>) {
        let count = self.lines.len().max(1);
        for index in 0..count {
            let text = self.lines.get(index).map(String::as_str).unwrap_or("");
            push_code(self.status.code, out);
            out.push(if index + 1 < count { b'-' } else { b' ' });
            if let Some(enhanced) = self.status.enhanced {
                out.extend_from_slice(enhanced.as_bytes());
                if !text.is_empty() {
                    out.push(b' ');
                }
            }
            // Never let a text carry a line break onto the wire.
            out.extend(text.bytes().map(|b| match b {
                b'\r' | b'\n' => b' ',
                other => other,
            }));
            out.extend_from_slice(b"\r\n");
        }
    }
}

/// A reply code's digits (every code we send has three).
fn push_code(code: u16, out: &mut Vec<u8>) {
    if (100..1000).contains(&code) {
        out.extend_from_slice(&[
            b'0' + (code / 100) as u8,
            b'0' + (code / 10 % 10) as u8,
            b'0' + (code % 10) as u8,
        ]);
    } else {
        out.extend_from_slice(code.to_string().as_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_line_with_enhanced_code() {
        assert_eq!(
            Reply::new(SENDER_OK, "Sender OK").to_wire(),
            "250 2.1.0 Sender OK\r\n"
        );
    }

    #[test]
    fn greeting_has_no_enhanced_code() {
        assert_eq!(
            Reply::new(SERVICE_READY, "mx.example ESMTP").to_wire(),
            "220 mx.example ESMTP\r\n"
        );
    }

    #[test]
    fn multiline() {
        let reply = Reply::multiline(
            HELLO_OK,
            vec!["mx.example".into(), "PIPELINING".into(), "8BITMIME".into()],
        );
        assert_eq!(
            reply.to_wire(),
            "250-mx.example\r\n250-PIPELINING\r\n250 8BITMIME\r\n"
        );
    }

    #[test]
    fn replies_are_appended_to_what_is_already_buffered() {
        let mut out = b"250 2.1.0 Sender OK\r\n".to_vec();
        Reply::new(START_DATA, "End data with <CR><LF>.<CR><LF>").write_wire(&mut out);
        assert_eq!(
            out,
            b"250 2.1.0 Sender OK\r\n354 End data with <CR><LF>.<CR><LF>\r\n"
        );
    }

    #[test]
    fn text_cannot_inject_lines() {
        assert_eq!(
            Reply::new(OK, "a\r\n250 b").to_wire(),
            "250 2.0.0 a  250 b\r\n"
        );
    }
}
