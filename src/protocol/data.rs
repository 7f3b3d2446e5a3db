//! Decodes the DATA stream (RFC 5321 4.1.1.4, 4.5.2): undoes dot-stuffing,
//! finds the end of data, and enforces the size and line limits while the
//! bytes stream in, so memory never exceeds the message size limit.
//!
//! Security rule (SMTP smuggling, 2023): the end of data is recognised only
//! as `<CRLF>.<CRLF>`. A bare LF or bare CR anywhere in the data makes the
//! whole message refused, and neither ever starts a new line for the purpose
//! of finding the terminator, so no second message can hide inside one DATA.

/// RFC 5321 4.5.3.1.6: a text line is at most 1000 octets including CRLF.
/// Real mail (HTML generators) has longer ones, so input takes lines up to
/// a configured bound (`limits.max_line_length`) and output folds them.
pub const MAX_TEXT_LINE: usize = 1000;
/// Default bound on input lines, as Postfix's line_length_limit is generous.
pub const DEFAULT_MAX_INPUT_LINE: usize = 64 * 1024;
/// Delivered-To values kept for loop detection; more are counted, not kept.
const MAX_DELIVERED_TO: usize = 100;

use super::address::Address;
use super::reply::{self, Reply};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataError {
    TooLarge,
    /// The spool could not take the message (disk full): try again later.
    NoStorage,
    LineTooLong,
    BareLineFeed,
    BareCarriageReturn,
}

impl DataError {
    pub fn describe(self) -> &'static str {
        match self {
            DataError::TooLarge => "Message exceeds the maximum message size",
            DataError::NoStorage => "Insufficient system storage, try again later",
            DataError::LineTooLong => "Message has a line longer than this server accepts",
            DataError::BareLineFeed => {
                "Message contains a bare LF; lines must end with CRLF (RFC 5321 2.3.8)"
            }
            DataError::BareCarriageReturn => {
                "Message contains a bare CR; lines must end with CRLF (RFC 5321 2.3.8)"
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// At the start of a line: after the 354 or after a CRLF.
    LineStart,
    /// A line started with '.'.
    LineStartDot,
    /// ".\r" at the start of a line: one LF away from the end.
    DotCr,
    InLine,
    /// Inside a line, after a CR.
    Cr,
}

/// Feed it the bytes that follow the 354 reply; it reports how many belong
/// to the message, so bytes pipelined after the terminator stay unread.
/// Decoded bytes go to the caller's buffer, which the caller empties (into
/// a spool) as it likes: the decoder itself holds no message.
#[derive(Debug)]
pub struct DataDecoder {
    headers: HeaderScan,
    state: State,
    line_length: usize,
    max_line: usize,
    max_size: usize,
    /// Size of the decoded message, counted even after it stops being kept.
    size: u64,
    error: Option<DataError>,
    /// Take runs of ordinary octets at once (off only in the tests that
    /// check this against deciding octet by octet).
    runs: bool,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Progress {
    /// Everything given was consumed; the message goes on.
    NeedMore,
    /// The terminator ended at `consumed`; later bytes are the next command.
    Done { consumed: usize },
}

impl DataDecoder {
    /// `max_size` octets in all, lines of at most `max_line` octets (CRLF
    /// included).
    pub fn new(max_size: usize, max_line: usize) -> DataDecoder {
        DataDecoder {
            headers: HeaderScan::default(),
            state: State::LineStart,
            line_length: 0,
            max_line,
            max_size,
            size: 0,
            error: None,
            runs: true,
        }
    }

    /// Decodes `input`, appending the message's bytes to `out` (none once
    /// the message is refused).
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> Progress {
        let mut index = 0;
        while index < input.len() {
            if self.runs && self.state == State::InLine {
                // Inside a line only CR and LF mean anything: the octets
                // up to the next one go through at once.
                let rest = &input[index..];
                let run = memchr::memchr2(b'\r', b'\n', rest).unwrap_or(rest.len());
                if run > 0 {
                    self.plain_run(&rest[..run], out);
                    index += run;
                    continue;
                }
            }
            let byte = input[index];
            index += 1;
            self.line_length += 1;
            if self.line_length > self.max_line {
                self.fail(DataError::LineTooLong);
            }
            match (self.state, byte) {
                (State::LineStart, b'.') => self.state = State::LineStartDot,
                (State::LineStartDot, b'\r') => self.state = State::DotCr,
                (State::DotCr, b'\n') => return Progress::Done { consumed: index },
                // ".\rX": the dot was stuffing, then a bare CR.
                (State::DotCr, _) => {
                    self.fail(DataError::BareCarriageReturn);
                    self.emit(b'\r', out);
                    self.plain_byte(byte, out);
                }
                // A leading dot followed by anything else is removed (4.5.2).
                (State::LineStartDot, _) => self.plain_byte(byte, out),
                (State::Cr, b'\n') => {
                    self.emit(b'\r', out);
                    self.emit(b'\n', out);
                    self.state = State::LineStart;
                    self.line_length = 0;
                }
                (State::Cr, _) => {
                    self.fail(DataError::BareCarriageReturn);
                    self.emit(b'\r', out);
                    self.plain_byte(byte, out);
                }
                (State::LineStart | State::InLine, _) => self.plain_byte(byte, out),
            }
        }
        Progress::NeedMore
    }

    /// A byte in the middle of a line. A bare LF does not end the line:
    /// treating it as one is exactly what smuggling attacks rely on.
    fn plain_byte(&mut self, byte: u8, out: &mut Vec<u8>) {
        match byte {
            b'\r' => self.state = State::Cr,
            b'\n' => {
                self.fail(DataError::BareLineFeed);
                self.emit(b'\n', out);
                self.state = State::InLine;
            }
            _ => {
                self.emit(byte, out);
                self.state = State::InLine;
            }
        }
    }

    /// Ordinary octets inside a line, with the same checks and in the same
    /// order as [`Self::emit`] makes them octet by octet: the first limit
    /// passed is the one reported, and what precedes it is kept.
    fn plain_run(&mut self, run: &[u8], out: &mut Vec<u8>) {
        // The run's octet (counting from 1) that passes each limit.
        let line_passed = self.max_line.saturating_sub(self.line_length) + 1;
        let size_passed = (self.max_size as u64).saturating_sub(self.size) + 1;
        let size_passed = usize::try_from(size_passed).unwrap_or(usize::MAX);
        if self.error.is_none() {
            let kept = run.len().min(line_passed - 1).min(size_passed - 1);
            out.extend_from_slice(&run[..kept]);
        }
        if line_passed <= run.len() && line_passed <= size_passed {
            self.fail(DataError::LineTooLong);
        } else if size_passed <= run.len() {
            self.fail(DataError::TooLarge);
        }
        self.line_length += run.len();
        self.size += run.len() as u64;
        self.headers.push_slice(run);
    }

    fn emit(&mut self, byte: u8, out: &mut Vec<u8>) {
        self.size += 1;
        self.headers.push(byte);
        if self.error.is_none() {
            if self.size > self.max_size as u64 {
                self.fail(DataError::TooLarge);
            } else {
                out.push(byte);
            }
        }
    }

    /// The message is refused; keep reading to the terminator (what the
    /// caller already took of it is the caller's to drop).
    fn fail(&mut self, error: DataError) {
        if self.error.is_none() {
            self.error = Some(error);
        }
    }

    /// What end-of-data checks need to know, or why the message is refused.
    pub fn finish(self) -> Result<DataSummary, DataError> {
        match self.error {
            Some(error) => Err(error),
            None => Ok(DataSummary {
                size: self.size,
                headers: self.headers.finish(),
            }),
        }
    }

    pub fn size(&self) -> u64 {
        self.size
    }
}

/// A message as DATA delivered it (its bytes went to the caller), with
/// what end-of-data checks need to know about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataSummary {
    /// Octets of the decoded message.
    pub size: u64,
    pub headers: HeaderSummary,
}

/// What the header section says about the message's travels, gathered
/// while the bytes stream past (so nothing has to be held to know it).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeaderSummary {
    /// Octets of the header section: up to the empty line, or the whole
    /// message when there is none.
    pub section_len: u64,
    /// `Received:` fields: the hops the message has made.
    pub received: usize,
    /// `Delivered-To:` values (the first few), for mail loop detection.
    pub delivered_to: Vec<String>,
    /// A `Date:` field is present (RFC 5322 requires one).
    pub has_date: bool,
    /// A `Message-ID:` field is present.
    pub has_message_id: bool,
    /// A `From:` field is present.
    pub has_from: bool,
}

impl HeaderSummary {
    /// The summary of a complete message (`petrel sendmail`, tests).
    pub fn of(content: &[u8]) -> HeaderSummary {
        let mut scan = HeaderScan::default();
        for &byte in &content[..header_section_len(content)] {
            scan.push(byte);
        }
        scan.finish()
    }
}

/// The limits a message's header section must keep.
#[derive(Debug, Clone, Copy)]
pub struct ContentLimits {
    pub max_header_size: u64,
    pub max_hops: usize,
}

/// Refusals that depend on the header section, decided when the message
/// is accepted (SMTP end of DATA, `petrel sendmail`) so that none of them
/// can turn into a bounce later: its size, its hop count, and a loop back
/// into a local mailbox it was delivered to before.
pub fn content_refusal<'a>(
    headers: &HeaderSummary,
    limits: &ContentLimits,
    local_mailboxes: impl IntoIterator<Item = &'a str>,
) -> Option<Reply> {
    if headers.section_len > limits.max_header_size {
        return Some(Reply::new(
            reply::HEADER_TOO_BIG,
            format!(
                "Message header section exceeds the limit of {} octets",
                limits.max_header_size
            ),
        ));
    }
    if headers.received >= limits.max_hops {
        return Some(Reply::new(
            reply::TOO_MANY_HOPS,
            format!(
                "Too many hops ({} Received headers, limit {}): mail loop?",
                headers.received, limits.max_hops
            ),
        ));
    }
    let delivered_before: Vec<String> = headers
        .delivered_to
        .iter()
        .filter_map(|value| {
            Address::parse(value.trim_start_matches('<').trim_end_matches('>'))
                .ok()
                .map(|address| address.mailbox_key())
        })
        .collect();
    for mailbox in local_mailboxes {
        if delivered_before.iter().any(|seen| seen == mailbox) {
            return Some(Reply::new(
                reply::MAIL_LOOP,
                format!("Mail loop: this message was already delivered to <{mailbox}>"),
            ));
        }
    }
    None
}

/// Watches decoded bytes line by line until the empty line that ends the
/// header section; keeps at most one line's start.
#[derive(Debug, Default)]
struct HeaderScan {
    summary: HeaderSummary,
    line: Vec<u8>,
    done: bool,
}

impl HeaderScan {
    fn push_slice(&mut self, bytes: &[u8]) {
        if self.done {
            return;
        }
        for &byte in bytes {
            self.push(byte);
        }
    }

    fn push(&mut self, byte: u8) {
        if self.done {
            return;
        }
        self.summary.section_len += 1;
        if self.line.len() < MAX_TEXT_LINE {
            self.line.push(byte);
        }
        if byte == b'\n' {
            let line = std::mem::take(&mut self.line);
            if line == b"\r\n" || line == b"\n" {
                // The empty line ends the section and is not part of it.
                self.summary.section_len -= line.len() as u64;
                self.done = true;
            } else {
                self.header_line(&line);
            }
            self.line = line;
            self.line.clear();
        }
    }

    fn header_line(&mut self, line: &[u8]) {
        let starts =
            |name: &[u8]| line.len() >= name.len() && line[..name.len()].eq_ignore_ascii_case(name);
        if starts(b"received:") {
            self.summary.received += 1;
        } else if starts(b"date:") {
            self.summary.has_date = true;
        } else if starts(b"message-id:") {
            self.summary.has_message_id = true;
        } else if starts(b"from:") {
            self.summary.has_from = true;
        } else if starts(b"delivered-to:") && self.summary.delivered_to.len() < MAX_DELIVERED_TO {
            let value = String::from_utf8_lossy(&line[b"delivered-to:".len()..]);
            self.summary.delivered_to.push(value.trim().to_string());
        }
    }

    fn finish(mut self) -> HeaderSummary {
        if !self.done && !self.line.is_empty() {
            // A last line without CRLF still belongs to the header section.
            let line = std::mem::take(&mut self.line);
            self.header_line(&line);
        }
        self.summary
    }
}

/// Length of a message's header section, up to and including the CRLF of
/// its last header line (the whole message when there is no empty line).
pub fn header_section_len(content: &[u8]) -> usize {
    content
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(content.len(), |p| p + 2)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(input: &[u8]) -> (Result<Vec<u8>, DataError>, Option<usize>) {
        let mut decoder = DataDecoder::new(1 << 20, MAX_TEXT_LINE);
        let mut out = Vec::new();
        let done = match decoder.feed(input, &mut out) {
            Progress::Done { consumed } => Some(consumed),
            Progress::NeedMore => None,
        };
        (decoder.finish().map(|_| out), done)
    }

    /// Runs of ordinary octets are taken at once; fed an octet at a time,
    /// every decision is made per octet. Both must agree on everything:
    /// output, where the data ends, the error, and the header summary.
    #[test]
    fn any_split_of_the_input_decodes_alike() {
        let mut next = crate::protocol::test_numbers(0x9e37_79b9_7f4a_7c15_u64);
        let decode = |input: &[u8],
                      chunks: &mut dyn FnMut(usize) -> usize,
                      limits: (usize, usize),
                      runs: bool| {
            let mut decoder = DataDecoder::new(limits.0, limits.1);
            decoder.runs = runs;
            let mut out = Vec::new();
            let mut offset = 0;
            let mut consumed = None;
            while offset < input.len() {
                let take = chunks(input.len() - offset);
                match decoder.feed(&input[offset..offset + take], &mut out) {
                    Progress::NeedMore => offset += take,
                    Progress::Done { consumed: at } => {
                        consumed = Some(offset + at);
                        break;
                    }
                }
            }
            (out, consumed, decoder.finish())
        };
        for _ in 0..300 {
            let mut input = Vec::new();
            for _ in 0..next(25) {
                let pieces: [&[u8]; 8] = [
                    b".",
                    b"\r",
                    b"\n",
                    b"\r\n",
                    b"Received: x\r\n",
                    b"abc",
                    b"\r\n\r\n",
                    b".\r\n",
                ];
                let piece = pieces[next(pieces.len())];
                let repeat = if next(8) == 0 { 40 } else { 1 };
                for _ in 0..repeat {
                    input.extend_from_slice(piece);
                }
            }
            input.extend_from_slice(b"\r\n.\r\n");
            let limits = (20 + next(300), 8 + next(60));
            let expected = decode(&input, &mut |_| 1, limits, false);
            let got = decode(&input, &mut |left| 1 + next(left), limits, true);
            assert_eq!(
                got,
                expected,
                "{:?} {limits:?}",
                String::from_utf8_lossy(&input)
            );
        }
    }

    #[test]
    fn plain_message_and_terminator() {
        let input = b"Subject: hi\r\n\r\nbody\r\n.\r\nQUIT\r\n";
        let (body, consumed) = decode(input);
        assert_eq!(body.unwrap(), b"Subject: hi\r\n\r\nbody\r\n");
        assert_eq!(consumed, Some(input.len() - b"QUIT\r\n".len()));
    }

    #[test]
    fn empty_message() {
        let (body, consumed) = decode(b".\r\n");
        assert_eq!(body.unwrap(), b"");
        assert_eq!(consumed, Some(3));
    }

    #[test]
    fn dot_unstuffing() {
        let (body, _) = decode(b"..\r\n..leading\r\n...\r\nmid.dle\r\n.\r\n");
        assert_eq!(body.unwrap(), b".\r\n.leading\r\n..\r\nmid.dle\r\n");
    }

    #[test]
    fn terminator_split_across_reads() {
        let mut decoder = DataDecoder::new(1024, MAX_TEXT_LINE);
        let mut out = Vec::new();
        let input = b"line\r\n.\r\nNEXT";
        for (i, byte) in input.iter().enumerate() {
            match decoder.feed(std::slice::from_ref(byte), &mut out) {
                Progress::NeedMore => assert!(i < 8),
                Progress::Done { consumed } => {
                    assert_eq!((i, consumed), (8, 1));
                    break;
                }
            }
        }
        assert_eq!(decoder.finish().unwrap().size, 6);
        assert_eq!(out, b"line\r\n");
    }

    #[test]
    fn smuggling_sequences_never_end_the_data() {
        for trick in [
            &b"\n.\r\n"[..],
            b"\r\n.\n",
            b"\n.\n",
            b"\r.\r\n",
            b"\r\n.\r",
        ] {
            let mut input = b"Subject: x\r\n\r\nhello".to_vec();
            input.extend_from_slice(trick);
            input.extend_from_slice(
                b"MAIL FROM:<evil@example.org>\r\nRCPT TO:<v@localhost>\r\nDATA\r\nspoof\r\n",
            );
            let mut decoder = DataDecoder::new(1 << 20, MAX_TEXT_LINE);
            let mut out = Vec::new();
            assert_eq!(
                decoder.feed(&input, &mut out),
                Progress::NeedMore,
                "{trick:?} ended DATA"
            );
            // Only the real terminator ends it, and the message is refused.
            assert!(matches!(
                decoder.feed(b"\r\n.\r\n", &mut out),
                Progress::Done { .. }
            ));
            let error = decoder.finish().unwrap_err();
            assert!(
                matches!(
                    error,
                    DataError::BareLineFeed | DataError::BareCarriageReturn
                ),
                "{trick:?}: {error:?}"
            );
        }
    }

    #[test]
    fn size_limit_while_streaming() {
        let mut decoder = DataDecoder::new(10, MAX_TEXT_LINE);
        let mut out = Vec::new();
        assert_eq!(
            decoder.feed(b"0123456789\r\n", &mut out),
            Progress::NeedMore
        );
        assert_eq!(out.len(), 10, "nothing beyond the limit is passed on");
        out.clear();
        assert!(matches!(
            decoder.feed(b"x\r\n.\r\n", &mut out),
            Progress::Done { .. }
        ));
        assert!(out.is_empty());
        assert_eq!(decoder.size(), 15);
        assert_eq!(decoder.finish(), Err(DataError::TooLarge));

        let mut decoder = DataDecoder::new(12, MAX_TEXT_LINE);
        assert!(matches!(
            decoder.feed(b"0123456789\r\n.\r\n", &mut out),
            Progress::Done { .. }
        ));
        assert!(decoder.finish().is_ok());
    }

    #[test]
    fn header_summary_while_streaming() {
        let message = b"Received: from a\r\n\tby b\r\nDelivered-To: alice@example.com\r\n\
            RECEIVED: from c\r\nSubject: x\r\n\r\nReceived: in the body\r\n";
        let mut input = message.to_vec();
        input.extend_from_slice(b".\r\n");
        let mut decoder = DataDecoder::new(1 << 20, MAX_TEXT_LINE);
        let mut out = Vec::new();
        for chunk in input.chunks(7) {
            decoder.feed(chunk, &mut out);
        }
        let decoded = decoder.finish().unwrap();
        let expected = HeaderSummary {
            section_len: header_section_len(message) as u64,
            received: 2,
            delivered_to: vec!["alice@example.com".into()],
            has_date: false,
            has_message_id: false,
            has_from: false,
        };
        assert_eq!(decoded.headers, expected);
        assert_eq!(HeaderSummary::of(message), expected);
        // No empty line: everything is header section.
        let headers_only = b"Received: x\r\nSubject: y";
        let all = HeaderSummary::of(headers_only);
        assert_eq!(
            (all.section_len, all.received),
            (headers_only.len() as u64, 1)
        );
    }

    #[test]
    fn header_section() {
        assert_eq!(header_section_len(b"A: 1\r\nB: 2\r\n\r\nbody\r\n"), 12);
        assert_eq!(header_section_len(b"A: 1\r\n"), 6);
        assert_eq!(header_section_len(b"\r\n\r\nbody"), 2);
    }

    #[test]
    fn line_length_limit() {
        let mut ok = vec![b'a'; 998];
        ok.extend_from_slice(b"\r\n.\r\n");
        assert!(decode(&ok).0.is_ok());
        let mut long = vec![b'a'; 999];
        long.extend_from_slice(b"\r\n.\r\n");
        let (body, consumed) = decode(&long);
        assert_eq!(body, Err(DataError::LineTooLong));
        assert!(consumed.is_some());
    }
}
