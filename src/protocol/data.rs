//! Decodes the DATA stream (RFC 5321 4.1.1.4, 4.5.2): undoes dot-stuffing,
//! finds the end of data, and enforces the size and line limits while the
//! bytes stream in, so memory never exceeds the message size limit.
//!
//! Security rule (SMTP smuggling, 2023): the end of data is recognised only
//! as `<CRLF>.<CRLF>`. A bare LF or bare CR anywhere in the data makes the
//! whole message refused, and neither ever starts a new line for the purpose
//! of finding the terminator, so no second message can hide inside one DATA.

/// RFC 5321 4.5.3.1.6: a text line is at most 1000 octets including CRLF.
pub const MAX_TEXT_LINE: usize = 1000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataError {
    TooLarge,
    LineTooLong,
    BareLineFeed,
    BareCarriageReturn,
}

impl DataError {
    pub fn describe(self) -> &'static str {
        match self {
            DataError::TooLarge => "Message exceeds the maximum message size",
            DataError::LineTooLong => "Message has a line longer than 1000 octets",
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
#[derive(Debug)]
pub struct DataDecoder {
    body: Vec<u8>,
    state: State,
    line_length: usize,
    max_size: usize,
    /// Size of the decoded message, counted even after it stops being kept.
    size: u64,
    error: Option<DataError>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Progress {
    /// Everything given was consumed; the message goes on.
    NeedMore,
    /// The terminator ended at `consumed`; later bytes are the next command.
    Done { consumed: usize },
}

impl DataDecoder {
    pub fn new(max_size: usize) -> DataDecoder {
        DataDecoder {
            body: Vec::new(),
            state: State::LineStart,
            line_length: 0,
            max_size,
            size: 0,
            error: None,
        }
    }

    pub fn feed(&mut self, input: &[u8]) -> Progress {
        for (index, &byte) in input.iter().enumerate() {
            self.line_length += 1;
            if self.line_length > MAX_TEXT_LINE {
                self.fail(DataError::LineTooLong);
            }
            match (self.state, byte) {
                (State::LineStart, b'.') => self.state = State::LineStartDot,
                (State::LineStartDot, b'\r') => self.state = State::DotCr,
                (State::DotCr, b'\n') => {
                    return Progress::Done {
                        consumed: index + 1,
                    };
                }
                // ".\rX": the dot was stuffing, then a bare CR.
                (State::DotCr, _) => {
                    self.fail(DataError::BareCarriageReturn);
                    self.emit(b'\r');
                    self.plain_byte(byte);
                }
                // A leading dot followed by anything else is removed (4.5.2).
                (State::LineStartDot, _) => self.plain_byte(byte),
                (State::Cr, b'\n') => {
                    self.emit(b'\r');
                    self.emit(b'\n');
                    self.state = State::LineStart;
                    self.line_length = 0;
                }
                (State::Cr, _) => {
                    self.fail(DataError::BareCarriageReturn);
                    self.emit(b'\r');
                    self.plain_byte(byte);
                }
                (State::LineStart | State::InLine, _) => self.plain_byte(byte),
            }
        }
        Progress::NeedMore
    }

    /// A byte in the middle of a line. A bare LF does not end the line:
    /// treating it as one is exactly what smuggling attacks rely on.
    fn plain_byte(&mut self, byte: u8) {
        match byte {
            b'\r' => self.state = State::Cr,
            b'\n' => {
                self.fail(DataError::BareLineFeed);
                self.emit(b'\n');
                self.state = State::InLine;
            }
            _ => {
                self.emit(byte);
                self.state = State::InLine;
            }
        }
    }

    fn emit(&mut self, byte: u8) {
        self.size += 1;
        if self.error.is_none() {
            if self.body.len() >= self.max_size {
                self.fail(DataError::TooLarge);
            } else {
                self.body.push(byte);
            }
        }
    }

    fn fail(&mut self, error: DataError) {
        if self.error.is_none() {
            self.error = Some(error);
            // The message is refused; keep reading to the terminator but
            // stop holding on to its bytes.
            self.body = Vec::new();
        }
    }

    /// The decoded message (with CRLF line ends), or why it is refused.
    pub fn finish(self) -> Result<Vec<u8>, DataError> {
        match self.error {
            Some(error) => Err(error),
            None => Ok(self.body),
        }
    }

    pub fn size(&self) -> u64 {
        self.size
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
        let mut decoder = DataDecoder::new(1 << 20);
        let done = match decoder.feed(input) {
            Progress::Done { consumed } => Some(consumed),
            Progress::NeedMore => None,
        };
        (decoder.finish(), done)
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
        let mut decoder = DataDecoder::new(1024);
        let input = b"line\r\n.\r\nNEXT";
        for (i, byte) in input.iter().enumerate() {
            match decoder.feed(std::slice::from_ref(byte)) {
                Progress::NeedMore => assert!(i < 8),
                Progress::Done { consumed } => {
                    assert_eq!((i, consumed), (8, 1));
                    break;
                }
            }
        }
        assert_eq!(decoder.finish().unwrap(), b"line\r\n");
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
            let mut decoder = DataDecoder::new(1 << 20);
            assert_eq!(
                decoder.feed(&input),
                Progress::NeedMore,
                "{trick:?} ended DATA"
            );
            // Only the real terminator ends it, and the message is refused.
            assert!(matches!(decoder.feed(b"\r\n.\r\n"), Progress::Done { .. }));
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
        let mut decoder = DataDecoder::new(10);
        assert_eq!(decoder.feed(b"0123456789\r\n"), Progress::NeedMore);
        assert!(decoder.body.is_empty(), "refused bytes are not kept");
        assert!(matches!(decoder.feed(b".\r\n"), Progress::Done { .. }));
        assert_eq!(decoder.size(), 12);
        assert_eq!(decoder.finish(), Err(DataError::TooLarge));

        let mut decoder = DataDecoder::new(12);
        assert!(matches!(
            decoder.feed(b"0123456789\r\n.\r\n"),
            Progress::Done { .. }
        ));
        assert!(decoder.finish().is_ok());
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
