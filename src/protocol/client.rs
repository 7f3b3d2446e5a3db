//! The client side of the wire, without IO: replies as a server sends
//! them (parsed a line at a time, bounded), the extensions an EHLO reply
//! names, and the message as DATA carries it (dot-stuffed, long lines
//! folded). Delivery's SMTP client, DKIM signing and `sendmail` use it.

/// A remote server's reply lines are short; anything longer is garbage.
const MAX_REPLY_LINES: usize = 200;

/// One reply from the remote server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerReply {
    pub code: u16,
    pub lines: Vec<String>,
}

impl ServerReply {
    pub fn is_positive(&self) -> bool {
        (200..400).contains(&self.code)
    }

    pub fn is_transient(&self) -> bool {
        (400..500).contains(&self.code)
    }

    /// The enhanced status code (RFC 3463) if the server gave one.
    pub fn enhanced(&self) -> Option<&str> {
        let first = self.lines.first()?;
        let token = first.split(' ').next()?;
        let mut parts = token.split('.');
        let class = parts.next()?;
        let valid = matches!(class, "2" | "4" | "5")
            && parts.clone().count() == 2
            && parts
                .all(|p| !p.is_empty() && p.len() <= 3 && p.chars().all(|c| c.is_ascii_digit()));
        valid.then_some(token)
    }
}

impl std::fmt::Display for ServerReply {
    /// "550 5.1.1 No such user" with continuation lines joined by spaces,
    /// as Postfix logs remote replies.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.code)?;
        for line in &self.lines {
            write!(f, " {line}")?;
        }
        Ok(())
    }
}

/// Parses reply lines as bytes arrive (sans-IO).
#[derive(Debug, Default)]
pub struct ReplyParser {
    lines: Vec<String>,
    code: Option<u16>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum ParseStep {
    More,
    Done(ServerReply),
}

impl ReplyParser {
    /// Takes one line without its CRLF.
    pub fn line(&mut self, line: &[u8]) -> Result<ParseStep, String> {
        let text = String::from_utf8_lossy(line);
        let bad = || {
            format!(
                "malformed reply line {:?}",
                text.chars().take(80).collect::<String>()
            )
        };
        // Work on bytes: a hostile server's text need not be ASCII, and
        // slicing a str inside a character would panic.
        let digits = line
            .get(..3)
            .filter(|d| d.iter().all(u8::is_ascii_digit))
            .ok_or_else(bad)?;
        let code = digits
            .iter()
            .fold(0u16, |code, digit| code * 10 + u16::from(digit - b'0'));
        if !(200..600).contains(&code) {
            return Err(bad());
        }
        if self.code.is_some_and(|c| c != code) {
            return Err(format!("reply code changed within a reply ({code})"));
        }
        self.code = Some(code);
        let separator = line.get(3).copied();
        let rest = String::from_utf8_lossy(line.get(4..).unwrap_or_default()).into_owned();
        self.lines.push(rest);
        if self.lines.len() > MAX_REPLY_LINES {
            return Err("reply has too many lines".into());
        }
        match separator {
            Some(b'-') => Ok(ParseStep::More),
            None | Some(b' ') => Ok(ParseStep::Done(ServerReply {
                code,
                lines: std::mem::take(&mut self.lines),
            })),
            Some(_) => Err(bad()),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Extensions {
    pub pipelining: bool,
    pub starttls: bool,
    pub eight_bit_mime: bool,
    pub smtputf8: bool,
    /// RFC 3461 delivery status notifications.
    pub dsn: bool,
    /// SIZE limit; 0 or absent means none announced.
    pub size: Option<u64>,
    pub auth: Vec<String>,
}

impl Extensions {
    /// From the lines of an EHLO reply (the first line is the greeting).
    pub fn parse(reply: &ServerReply) -> Extensions {
        let mut extensions = Extensions::default();
        for line in reply.lines.iter().skip(1) {
            let mut words = line.split_whitespace();
            let Some(keyword) = words.next() else {
                continue;
            };
            match keyword.to_ascii_uppercase().as_str() {
                "PIPELINING" => extensions.pipelining = true,
                "STARTTLS" => extensions.starttls = true,
                "8BITMIME" => extensions.eight_bit_mime = true,
                "SMTPUTF8" => extensions.smtputf8 = true,
                "DSN" => extensions.dsn = true,
                "SIZE" => {
                    extensions.size = words.next().and_then(|n| n.parse().ok()).filter(|&n| n > 0)
                }
                "AUTH" => extensions.auth = words.map(|w| w.to_ascii_uppercase()).collect(),
                _ => {}
            }
        }
        extensions
    }
}

/// Longest line sent, CRLF not included (RFC 5321 4.5.3.1.6).
pub const MAX_LINE_OUT: usize = 998;

/// Prepares a message for DATA a chunk at a time: dot-stuffs it (RFC 5321
/// 4.5.2), folds lines over 998 octets by inserting CRLF SPACE (as
/// Postfix's smtp_line_length_limit does, which keeps MIME structure
/// intact; petrel takes longer lines in, so it must not pass them on), and
/// makes sure the message ends with CRLF. Folding applies on 8BITMIME hops
/// too: only BINARYMIME lifts the line limit, and petrel does not send it.
#[derive(Debug)]
pub struct DotStuffer {
    at_line_start: bool,
    /// Octets on the current line so far.
    line_length: usize,
    /// The last two octets seen, to know how the message ends.
    tail: [u8; 2],
    /// Off: lines are only folded, as the receiver will see them once it
    /// has removed the stuffing (what a DKIM signature must cover).
    stuffing: bool,
}

impl Default for DotStuffer {
    fn default() -> Self {
        DotStuffer {
            at_line_start: true,
            line_length: 0,
            tail: [0, 0],
            stuffing: true,
        }
    }
}

impl DotStuffer {
    /// Folds long lines exactly as sending will, without dot-stuffing.
    pub fn folding_only() -> DotStuffer {
        DotStuffer {
            stuffing: false,
            ..DotStuffer::default()
        }
    }

    pub fn push(&mut self, chunk: &[u8], out: &mut Vec<u8>) {
        out.reserve(chunk.len() + chunk.len() / 64 + 2);
        let mut rest = chunk;
        while !rest.is_empty() {
            let end = memchr::memchr(b'\n', rest).map_or(rest.len(), |at| at + 1);
            let (segment, after) = rest.split_at(end);
            self.push_segment(segment, out);
            rest = after;
        }
    }

    /// A line, or the part of one a chunk holds, copied whole when it
    /// needs no folding and has no bare CR (nearly always); octet by
    /// octet otherwise.
    fn push_segment(&mut self, segment: &[u8], out: &mut Vec<u8>) {
        let ends_line = segment.last() == Some(&b'\n');
        let text = segment.strip_suffix(b"\n").unwrap_or(segment);
        let text = text.strip_suffix(b"\r").unwrap_or(text);
        let stuffed = self.stuffing && self.at_line_start && text.first() == Some(&b'.');
        let length = self.line_length + usize::from(stuffed) + text.len();
        if length > MAX_LINE_OUT || memchr::memchr(b'\r', text).is_some() {
            for &byte in segment {
                self.push_byte(byte, out);
            }
            return;
        }
        if stuffed {
            out.push(b'.');
        }
        out.extend_from_slice(segment);
        self.line_length = if ends_line { 0 } else { length };
        self.at_line_start = ends_line;
        self.tail = match segment {
            [.., a, b] => [*a, *b],
            [b] => [self.tail[1], *b],
            [] => self.tail,
        };
    }

    fn push_byte(&mut self, byte: u8, out: &mut Vec<u8>) {
        if byte != b'\r' && byte != b'\n' && self.line_length >= MAX_LINE_OUT {
            out.extend_from_slice(b"\r\n ");
            self.line_length = 1;
            self.at_line_start = false;
        }
        if self.stuffing && self.at_line_start && byte == b'.' {
            out.push(b'.');
            self.line_length += 1;
        }
        out.push(byte);
        self.at_line_start = byte == b'\n';
        if byte == b'\n' {
            self.line_length = 0;
        } else if byte != b'\r' {
            self.line_length += 1;
        }
        self.tail = [self.tail[1], byte];
    }

    /// What must follow the last chunk before the terminating ".CRLF".
    pub fn finish(&self, out: &mut Vec<u8>) {
        if self.tail != *b"\r\n" {
            out.extend_from_slice(b"\r\n");
        }
    }
}

/// Dot-stuffs a whole message held in memory.
#[cfg(test)]
pub fn dot_stuff(content: &[u8]) -> Vec<u8> {
    let mut stuffer = DotStuffer::default();
    let mut out = Vec::new();
    stuffer.push(content, &mut out);
    stuffer.finish(&mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(lines: &[&str]) -> Result<ServerReply, String> {
        let mut parser = ReplyParser::default();
        for line in lines {
            if let ParseStep::Done(reply) = parser.line(line.as_bytes())? {
                return Ok(reply);
            }
        }
        Err("incomplete".into())
    }

    #[test]
    fn replies_parse() {
        let reply = parse(&["250-mx.example Hello", "250-PIPELINING", "250 SIZE 1000"]).unwrap();
        assert_eq!(reply.code, 250);
        assert_eq!(reply.lines.len(), 3);
        let extensions = Extensions::parse(&reply);
        assert!(extensions.pipelining);
        assert_eq!(extensions.size, Some(1000));
        let reply = parse(&["550 5.1.1 No such user"]).unwrap();
        assert_eq!(reply.enhanced(), Some("5.1.1"));
        assert_eq!(reply.to_string(), "550 5.1.1 No such user");
        assert_eq!(parse(&["354 go ahead"]).unwrap().enhanced(), None);
        assert_eq!(parse(&["250"]).unwrap().lines, vec![""]);
    }

    #[test]
    fn bad_replies_are_errors() {
        assert!(parse(&["hello"]).is_err());
        assert!(
            parse(&["\u{e9}\u{e9}\u{e9}"]).is_err(),
            "non-ASCII never panics"
        );
        assert!(parse(&["25"]).is_err());
        assert!(parse(&["999 what"]).is_err());
        assert!(parse(&["250-a", "251 b"]).is_err());
        assert!(parse(&["250xhello"]).is_err());
    }

    #[test]
    fn extensions() {
        let reply = parse(&[
            "250-mx",
            "250-STARTTLS",
            "250-8BITMIME",
            "250-SMTPUTF8",
            "250-AUTH PLAIN login",
            "250 SIZE",
        ])
        .unwrap();
        let extensions = Extensions::parse(&reply);
        assert!(extensions.starttls && extensions.eight_bit_mime && extensions.smtputf8);
        assert_eq!(extensions.auth, vec!["PLAIN", "LOGIN"]);
        assert_eq!(extensions.size, None);
    }

    #[test]
    fn whole_lines_are_stuffed_exactly_as_octet_by_octet() {
        // Lines of every kind (dots, bare CRs, long ones to fold), split at
        // arbitrary points: the fast path must not change a single octet.
        let mut next = crate::protocol::test_numbers(0x2545_f491_4f6c_dd1d_u64);
        for _ in 0..200 {
            let mut message = Vec::new();
            for _ in 0..next(20) {
                let pieces: [&[u8]; 6] = [b".", b"\r", b"\n", b"\r\n", b"x", b"abcdefghij"];
                let piece = pieces[next(pieces.len())];
                let repeat = if next(10) == 0 { 150 } else { 1 + next(3) };
                for _ in 0..repeat {
                    message.extend_from_slice(piece);
                }
            }
            let mut expected = Vec::new();
            let mut reference = DotStuffer::default();
            for &byte in &message {
                reference.push_byte(byte, &mut expected);
            }
            reference.finish(&mut expected);
            let mut got = Vec::new();
            let mut stuffer = DotStuffer::default();
            let mut rest = &message[..];
            while !rest.is_empty() {
                let (chunk, after) = rest.split_at(1 + next(rest.len()));
                stuffer.push(chunk, &mut got);
                rest = after;
            }
            stuffer.finish(&mut got);
            assert_eq!(got, expected, "{:?}", String::from_utf8_lossy(&message));
        }
    }

    #[test]
    fn dot_stuffing() {
        assert_eq!(dot_stuff(b".a\r\nb\r\n..c\r\n"), b"..a\r\nb\r\n...c\r\n");
        assert_eq!(dot_stuff(b"no newline"), b"no newline\r\n");
        assert_eq!(dot_stuff(b""), b"\r\n");
        // Lines over 998 octets are folded with CRLF SPACE, at any split.
        let long = [b"X: ".as_slice(), &[b'a'; 2000], b"\r\n.x\r\n"].concat();
        let sent = dot_stuff(&long);
        assert!(sent.split(|&b| b == b'\n').all(|line| line.len() <= 1000));
        let unfolded: Vec<u8> = String::from_utf8(sent.clone())
            .unwrap()
            .replace("\r\n ", "")
            .into_bytes();
        assert_eq!(
            unfolded,
            [b"X: ".as_slice(), &[b'a'; 2000], b"\r\n..x\r\n"].concat()
        );
        let exact = [&[b'b'; 998][..], b"\r\n"].concat();
        assert_eq!(dot_stuff(&exact), exact, "998 octets is not folded");
        // Chunk boundaries anywhere give the same result.
        let message = b"x\r\n.one\r\n..two\r\nend\r\n";
        for split in 0..message.len() {
            let mut stuffer = DotStuffer::default();
            let mut out = Vec::new();
            stuffer.push(&message[..split], &mut out);
            stuffer.push(&message[split..], &mut out);
            stuffer.finish(&mut out);
            assert_eq!(out, dot_stuff(message), "split at {split}");
        }
    }
}
