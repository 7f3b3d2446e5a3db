//! The Sendmail/Postfix milter protocol, version 6, from the mail
//! server's side, as data: the commands petrel sends to a content filter
//! and the responses it reads back, each a packet of a 4-octet length, a
//! command letter and its data. No IO here: the caller owns the socket.
//!
//! What a milter may send is bounded before anything is allocated: a
//! packet longer than [`MAX_PACKET`] (petrel never offers the larger
//! body chunks of `SMFIP_MDS_256K`/`_1M`) is an error, whatever its
//! length field claims.

use std::fmt;

/// The protocol version petrel speaks.
pub const VERSION: u32 = 6;

/// The longest packet read: a 64 KiB body chunk with its command letter,
/// and room for the largest header a milter may add.
pub const MAX_PACKET: usize = 65_536 + 1024;

/// The largest body chunk sent to a milter (libmilter's `MILTER_CHUNK_SIZE`).
pub const BODY_CHUNK: usize = 65_535;

/// What a milter may change (`SMFIF_*`), offered by the server and asked
/// for by the milter.
pub mod actions {
    pub const ADD_HEADERS: u32 = 0x01;
    pub const CHANGE_BODY: u32 = 0x02;
    pub const ADD_RECIPIENTS: u32 = 0x04;
    pub const DELETE_RECIPIENTS: u32 = 0x08;
    pub const CHANGE_HEADERS: u32 = 0x10;
    pub const QUARANTINE: u32 = 0x20;
    /// What petrel lets a milter do (not CHGFROM, not ADDRCPT_PAR).
    pub const OFFERED: u32 = ADD_HEADERS
        | CHANGE_BODY
        | ADD_RECIPIENTS
        | DELETE_RECIPIENTS
        | CHANGE_HEADERS
        | QUARANTINE;
}

/// Steps a milter may leave out, and steps it will not answer
/// (`SMFIP_*`).
pub mod steps {
    pub const NO_CONNECT: u32 = 0x01;
    pub const NO_HELO: u32 = 0x02;
    pub const NO_MAIL: u32 = 0x04;
    pub const NO_RCPT: u32 = 0x08;
    pub const NO_BODY: u32 = 0x10;
    pub const NO_HEADERS: u32 = 0x20;
    pub const NO_END_OF_HEADERS: u32 = 0x40;
    pub const NO_REPLY_HEADER: u32 = 0x80;
    pub const NO_UNKNOWN: u32 = 0x100;
    pub const NO_DATA: u32 = 0x200;
    /// The server understands SMFIR_SKIP (no more body chunks).
    pub const SKIP: u32 = 0x400;
    pub const NO_REPLY_CONNECT: u32 = 0x1000;
    pub const NO_REPLY_HELO: u32 = 0x2000;
    pub const NO_REPLY_MAIL: u32 = 0x4000;
    pub const NO_REPLY_RCPT: u32 = 0x8000;
    pub const NO_REPLY_DATA: u32 = 0x1_0000;
    pub const NO_REPLY_UNKNOWN: u32 = 0x2_0000;
    pub const NO_REPLY_END_OF_HEADERS: u32 = 0x4_0000;
    pub const NO_REPLY_BODY: u32 = 0x8_0000;
    /// Everything petrel can leave out or go without a reply to.
    pub const OFFERED: u32 = NO_CONNECT
        | NO_HELO
        | NO_MAIL
        | NO_RCPT
        | NO_BODY
        | NO_HEADERS
        | NO_END_OF_HEADERS
        | NO_REPLY_HEADER
        | NO_UNKNOWN
        | NO_DATA
        | SKIP
        | NO_REPLY_CONNECT
        | NO_REPLY_HELO
        | NO_REPLY_MAIL
        | NO_REPLY_RCPT
        | NO_REPLY_DATA
        | NO_REPLY_UNKNOWN
        | NO_REPLY_END_OF_HEADERS
        | NO_REPLY_BODY;
}

/// The conversation's stages, as macro packets name them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Connect,
    Helo,
    Mail,
    Rcpt,
    Data,
    EndOfHeaders,
    EndOfMessage,
}

impl Stage {
    fn letter(self) -> u8 {
        match self {
            Stage::Connect => b'C',
            Stage::Helo => b'H',
            Stage::Mail => b'M',
            Stage::Rcpt => b'R',
            Stage::Data => b'T',
            Stage::EndOfHeaders => b'N',
            Stage::EndOfMessage => b'E',
        }
    }

    /// Whether the milter left this stage out (`steps::NO_*`).
    pub fn skipped(self, protocol: u32) -> bool {
        let flag = match self {
            Stage::Connect => steps::NO_CONNECT,
            Stage::Helo => steps::NO_HELO,
            Stage::Mail => steps::NO_MAIL,
            Stage::Rcpt => steps::NO_RCPT,
            Stage::Data => steps::NO_DATA,
            Stage::EndOfHeaders => steps::NO_END_OF_HEADERS,
            Stage::EndOfMessage => 0,
        };
        protocol & flag != 0
    }

    /// Whether the milter sends no reply to this stage (`steps::NO_REPLY_*`).
    pub fn unanswered(self, protocol: u32) -> bool {
        let flag = match self {
            Stage::Connect => steps::NO_REPLY_CONNECT,
            Stage::Helo => steps::NO_REPLY_HELO,
            Stage::Mail => steps::NO_REPLY_MAIL,
            Stage::Rcpt => steps::NO_REPLY_RCPT,
            Stage::Data => steps::NO_REPLY_DATA,
            Stage::EndOfHeaders => steps::NO_REPLY_END_OF_HEADERS,
            Stage::EndOfMessage => 0,
        };
        protocol & flag != 0
    }
}

/// The client's address family, as the connect packet gives it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Inet,
    Inet6,
    Unknown,
}

/// A packet petrel sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command<'a> {
    Negotiate {
        version: u32,
        actions: u32,
        protocol: u32,
    },
    /// Values of macros, sent before the stage's own command.
    Macros {
        stage: Stage,
        pairs: &'a [(&'a str, String)],
    },
    Connect {
        hostname: &'a str,
        family: Family,
        port: u16,
        address: &'a str,
    },
    Helo(&'a str),
    /// The sender in angle brackets, then its ESMTP parameters.
    Mail(&'a [String]),
    /// The recipient in angle brackets, then its ESMTP parameters.
    Rcpt(&'a [String]),
    Data,
    Header {
        name: &'a str,
        value: &'a str,
    },
    EndOfHeaders,
    Body(&'a [u8]),
    EndOfMessage,
    Abort,
    Quit,
}

impl Command<'_> {
    /// Appends the packet to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&[0; 4]);
        match self {
            Command::Negotiate {
                version,
                actions,
                protocol,
            } => {
                out.push(b'O');
                for number in [version, actions, protocol] {
                    out.extend_from_slice(&number.to_be_bytes());
                }
            }
            Command::Macros { stage, pairs } => {
                out.push(b'D');
                out.push(stage.letter());
                for (name, value) in pairs.iter() {
                    push_string(out, name);
                    push_string(out, value);
                }
            }
            Command::Connect {
                hostname,
                family,
                port,
                address,
            } => {
                out.push(b'C');
                push_string(out, hostname);
                match family {
                    Family::Inet => out.push(b'4'),
                    Family::Inet6 => out.push(b'6'),
                    Family::Unknown => out.push(b'U'),
                }
                if *family != Family::Unknown {
                    out.extend_from_slice(&port.to_be_bytes());
                    push_string(out, address);
                }
            }
            Command::Helo(name) => {
                out.push(b'H');
                push_string(out, name);
            }
            Command::Mail(args) | Command::Rcpt(args) => {
                out.push(if matches!(self, Command::Mail(_)) {
                    b'M'
                } else {
                    b'R'
                });
                for arg in args.iter() {
                    push_string(out, arg);
                }
            }
            Command::Data => out.push(b'T'),
            Command::Header { name, value } => {
                out.push(b'L');
                push_string(out, name);
                push_string(out, value);
            }
            Command::EndOfHeaders => out.push(b'N'),
            Command::Body(chunk) => {
                out.push(b'B');
                out.extend_from_slice(chunk);
            }
            Command::EndOfMessage => out.push(b'E'),
            Command::Abort => out.push(b'A'),
            Command::Quit => out.push(b'Q'),
        }
        let len = u32::try_from(out.len() - start - 4).unwrap_or(u32::MAX);
        out[start..start + 4].copy_from_slice(&len.to_be_bytes());
    }
}

/// NUL marks the end of a string in the protocol: one inside a value
/// (from the network) would cut it short or shift the fields after it.
fn push_string(out: &mut Vec<u8>, text: &str) {
    out.extend(text.bytes().filter(|&b| b != 0));
    out.push(0);
}

/// A packet a milter sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    Negotiated {
        version: u32,
        actions: u32,
        protocol: u32,
    },
    Continue,
    /// Accept the message; this milter wants to see no more of it.
    Accept,
    Reject,
    Tempfail,
    /// Accept and throw away.
    Discard,
    /// `NNN X.Y.Z text`, a reject or tempfail with the milter's words.
    ReplyCode(String),
    /// No more body chunks, please.
    Skip,
    /// Still working: wait on.
    Progress,
    AddHeader {
        name: String,
        value: String,
    },
    /// At `index` among all header fields (0: the first).
    InsertHeader {
        index: u32,
        name: String,
        value: String,
    },
    /// The `index`th (from 1) field named `name`; an empty value deletes it.
    ChangeHeader {
        index: u32,
        name: String,
        value: String,
    },
    AddRecipient(String),
    DeleteRecipient(String),
    /// A piece of the new body; pieces follow one another.
    ReplaceBody(Vec<u8>),
    Quarantine(String),
    /// What petrel did not offer (CHGFROM, ADDRCPT_PAR, symbol lists,
    /// connection failures): named, for the error.
    Unexpected(char),
}

/// Why a milter's packets are not understood.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MilterError(pub String);

impl fmt::Display for MilterError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Cuts packets out of what a milter sends, holding at most one packet.
#[derive(Default)]
pub struct PacketReader {
    buffer: Vec<u8>,
}

impl PacketReader {
    pub fn push(&mut self, bytes: &[u8]) {
        self.buffer.extend_from_slice(bytes);
    }

    /// How many more octets the packet being read needs, at least.
    pub fn wanted(&self) -> usize {
        match self.declared_len() {
            Some(len) => (4 + len).saturating_sub(self.buffer.len()).max(1),
            None => 4 - self.buffer.len().min(3),
        }
    }

    fn declared_len(&self) -> Option<usize> {
        let bytes: [u8; 4] = self.buffer.get(..4)?.try_into().ok()?;
        Some(u32::from_be_bytes(bytes) as usize)
    }

    /// The next whole packet, if it has arrived.
    pub fn next_response(&mut self) -> Result<Option<Response>, MilterError> {
        let Some(len) = self.declared_len() else {
            return Ok(None);
        };
        if len == 0 {
            return Err(MilterError("an empty packet".into()));
        }
        if len > MAX_PACKET {
            return Err(MilterError(format!(
                "a packet of {len} octets (at most {MAX_PACKET} are read)"
            )));
        }
        if self.buffer.len() < 4 + len {
            return Ok(None);
        }
        let packet: Vec<u8> = self.buffer.drain(..4 + len).skip(4).collect();
        // Keep the buffer from holding on to a large packet's memory.
        if self.buffer.is_empty() && self.buffer.capacity() > 2 * MAX_PACKET {
            self.buffer = Vec::new();
        }
        parse_response(packet[0], &packet[1..]).map(Some)
    }
}

fn parse_response(command: u8, data: &[u8]) -> Result<Response, MilterError> {
    let bare = |response: Response| {
        if data.is_empty() {
            Ok(response)
        } else {
            Err(MilterError(format!(
                "'{}' carries {} octets it should not",
                command as char,
                data.len()
            )))
        }
    };
    match command {
        b'O' => {
            let number = |at: usize| -> Result<u32, MilterError> {
                let bytes: [u8; 4] = data
                    .get(at..at + 4)
                    .and_then(|b| b.try_into().ok())
                    .ok_or_else(|| MilterError("a short option negotiation".into()))?;
                Ok(u32::from_be_bytes(bytes))
            };
            // What follows the three numbers (macro lists the milter
            // would like) is ignored: petrel sends its own set.
            Ok(Response::Negotiated {
                version: number(0)?,
                actions: number(4)?,
                protocol: number(8)?,
            })
        }
        b'c' => bare(Response::Continue),
        b'a' => bare(Response::Accept),
        b'r' => bare(Response::Reject),
        b't' => bare(Response::Tempfail),
        b'd' => bare(Response::Discard),
        b's' => bare(Response::Skip),
        b'p' => bare(Response::Progress),
        b'y' => {
            let [text] = strings::<1>(data)?;
            Ok(Response::ReplyCode(text))
        }
        b'h' => {
            let [name, value] = strings::<2>(data)?;
            Ok(Response::AddHeader { name, value })
        }
        b'i' | b'm' => {
            let (index, rest) = split_index(data)?;
            let [name, value] = strings::<2>(rest)?;
            Ok(if command == b'i' {
                Response::InsertHeader { index, name, value }
            } else {
                Response::ChangeHeader { index, name, value }
            })
        }
        b'+' => {
            let [recipient] = strings::<1>(data)?;
            Ok(Response::AddRecipient(recipient))
        }
        b'-' => {
            let [recipient] = strings::<1>(data)?;
            Ok(Response::DeleteRecipient(recipient))
        }
        b'b' => Ok(Response::ReplaceBody(data.to_vec())),
        b'q' => {
            let [reason] = strings::<1>(data)?;
            Ok(Response::Quarantine(reason))
        }
        other => Ok(Response::Unexpected(other as char)),
    }
}

fn split_index(data: &[u8]) -> Result<(u32, &[u8]), MilterError> {
    let bytes: [u8; 4] = data
        .get(..4)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| MilterError("a header change without its index".into()))?;
    Ok((u32::from_be_bytes(bytes), &data[4..]))
}

/// `N` NUL-terminated strings, and nothing after them but NULs.
fn strings<const N: usize>(data: &[u8]) -> Result<[String; N], MilterError> {
    let mut parts = data.split(|&b| b == 0);
    let mut found: [String; N] = std::array::from_fn(|_| String::new());
    for slot in &mut found {
        let part = parts
            .next()
            .ok_or_else(|| MilterError(format!("{N} strings expected")))?;
        *slot = String::from_utf8_lossy(part).into_owned();
    }
    if !data.ends_with(&[0]) {
        return Err(MilterError("a string without its terminating NUL".into()));
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encoded(command: Command) -> Vec<u8> {
        let mut out = Vec::new();
        command.encode(&mut out);
        out
    }

    #[test]
    fn commands_are_framed_as_libmilter_reads_them() {
        assert_eq!(
            encoded(Command::Negotiate {
                version: 6,
                actions: 0x3f,
                protocol: 0x1fffff
            }),
            b"\0\0\0\x0dO\0\0\0\x06\0\0\0\x3f\0\x1f\xff\xff"
        );
        assert_eq!(
            encoded(Command::Connect {
                hostname: "mx.example.org",
                family: Family::Inet,
                port: 25,
                address: "192.0.2.7"
            }),
            b"\0\0\0\x1dCmx.example.org\x004\x00\x19192.0.2.7\0"
        );
        assert_eq!(
            encoded(Command::Mail(&["<a@example.org>".into(), "SIZE=10".into()])),
            b"\0\0\0\x19M<a@example.org>\0SIZE=10\0"
        );
        assert_eq!(
            encoded(Command::Macros {
                stage: Stage::Mail,
                pairs: &[("i", "ABC".into()), ("{mail_addr}", "a@b".into())]
            }),
            b"\0\0\0\x18DMi\0ABC\0{mail_addr}\0a@b\0"
        );
        assert_eq!(encoded(Command::EndOfMessage), b"\0\0\0\x01E");
        // A NUL from the network cannot shift the fields.
        assert_eq!(
            encoded(Command::Helo("evil\0name")),
            b"\0\0\0\x0aHevilname\0"
        );
    }

    fn read_all(bytes: &[u8]) -> Result<Vec<Response>, MilterError> {
        let mut reader = PacketReader::default();
        let mut responses = Vec::new();
        // A byte at a time: packets cut anywhere come out whole.
        for byte in bytes {
            reader.push(&[*byte]);
            while let Some(response) = reader.next_response()? {
                responses.push(response);
            }
        }
        Ok(responses)
    }

    #[test]
    fn responses_parse_at_any_split() {
        let mut bytes = Vec::new();
        for (letter, data) in [
            (b'h', &b"X-Spam\0yes\0"[..]),
            (b'i', &b"\0\0\0\x01X-First\0one\0"[..]),
            (b'm', &b"\0\0\0\x02Subject\0\0"[..]),
            (b'+', &b"<new@example.test>\0"[..]),
            (b'-', &b"<old@example.test>\0"[..]),
            (b'b', &b"new body\r\n"[..]),
            (b'q', &b"held for review\0"[..]),
            (b'y', &b"554 5.7.1 Gtube pattern\0"[..]),
            (b'c', &b""[..]),
        ] {
            bytes.extend_from_slice(&(data.len() as u32 + 1).to_be_bytes());
            bytes.push(letter);
            bytes.extend_from_slice(data);
        }
        assert_eq!(
            read_all(&bytes).unwrap(),
            [
                Response::AddHeader {
                    name: "X-Spam".into(),
                    value: "yes".into()
                },
                Response::InsertHeader {
                    index: 1,
                    name: "X-First".into(),
                    value: "one".into()
                },
                Response::ChangeHeader {
                    index: 2,
                    name: "Subject".into(),
                    value: String::new()
                },
                Response::AddRecipient("<new@example.test>".into()),
                Response::DeleteRecipient("<old@example.test>".into()),
                Response::ReplaceBody(b"new body\r\n".to_vec()),
                Response::Quarantine("held for review".into()),
                Response::ReplyCode("554 5.7.1 Gtube pattern".into()),
                Response::Continue,
            ]
        );
    }

    #[test]
    fn hostile_packets_are_errors_without_allocating_their_claims() {
        // A 1 GB length field: refused from its four octets alone.
        let error = read_all(&[0x40, 0, 0, 0]).unwrap_err();
        assert!(error.0.contains("1073741824 octets"), "{error}");
        assert!(read_all(&[0, 0, 0, 0]).is_err());
        for (bad, why) in [
            (&b"\0\0\0\x02cX"[..], "carries"),
            (&b"\0\0\0\x03yab"[..], "NUL"),
            (&b"\0\0\0\x03i\0\0"[..], "index"),
            (&b"\0\0\0\x05O\0\0\0\x06"[..], "short"),
        ] {
            let error = read_all(bad).unwrap_err();
            assert!(error.0.contains(why), "{bad:?}: {error}");
        }
        assert_eq!(
            read_all(b"\0\0\0\x01e").unwrap(),
            [Response::Unexpected('e')]
        );
    }

    #[test]
    fn stages_follow_the_milters_flags() {
        let protocol = steps::NO_HELO | steps::NO_REPLY_RCPT;
        assert!(Stage::Helo.skipped(protocol));
        assert!(!Stage::Mail.skipped(protocol));
        assert!(Stage::Rcpt.unanswered(protocol));
        assert!(!Stage::EndOfMessage.unanswered(u32::MAX));
        assert!(!Stage::EndOfMessage.skipped(u32::MAX));
    }
}
