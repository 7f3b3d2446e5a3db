//! Splits the command stream into lines without ever holding more than a
//! bounded amount of input (RFC 5321 4.5.3.1.4: a command line is at most
//! 512 octets; AUTH responses may reach 12288, RFC 4954 4).

/// The longest line we keep; longer lines are discarded up to their end
/// and reported as [`Line::TooLong`].
pub const MAX_BUFFERED_LINE: usize = 12_288;

#[derive(Debug, PartialEq, Eq)]
pub enum Line<'a> {
    /// A line without its line ending, lent until the next call.
    Complete(&'a [u8]),
    TooLong,
}

#[derive(Debug, Default)]
pub struct LineReader {
    buffer: Vec<u8>,
    /// Where the unread input starts: lines handed out stay in the buffer
    /// until the next push, so none needs a copy of its own.
    start: usize,
    /// Inside an over-long line: drop bytes until its end.
    discarding: bool,
}

impl LineReader {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn push(&mut self, data: &[u8]) {
        self.buffer.drain(..self.start);
        self.start = 0;
        let data = if self.discarding {
            // Keep only what follows the end of the over-long line; its LF
            // stays so that next_line reports the line as too long.
            match data.iter().position(|&b| b == b'\n') {
                Some(end) => &data[end..],
                None => return,
            }
        } else {
            data
        };
        self.buffer.extend_from_slice(data);
        if !self.discarding && self.buffer.len() > MAX_BUFFERED_LINE && !self.has_line() {
            self.buffer.clear();
            self.discarding = true;
        }
    }

    fn has_line(&self) -> bool {
        self.buffered().contains(&b'\n')
    }

    /// The next complete line. Lines end with CRLF; a bare LF is accepted
    /// as well in commands (as Postfix does), never in DATA.
    pub fn next_line(&mut self) -> Option<Line<'_>> {
        let line_start = self.start;
        let end = line_start + self.buffered().iter().position(|&b| b == b'\n')?;
        self.start = end + 1;
        let mut line_end = end;
        if line_end > line_start && self.buffer[line_end - 1] == b'\r' {
            line_end -= 1;
        }
        let too_long =
            std::mem::take(&mut self.discarding) || line_end - line_start > MAX_BUFFERED_LINE;
        if self.buffered().len() > MAX_BUFFERED_LINE && !self.has_line() {
            self.buffer.truncate(self.start);
            self.discarding = true;
        }
        Some(if too_long {
            Line::TooLong
        } else {
            Line::Complete(&self.buffer[line_start..line_end])
        })
    }

    /// True when input is buffered but no full line: the moment to flush
    /// pipelined replies before blocking on the socket (RFC 2920 3.1).
    pub fn has_complete_line(&self) -> bool {
        self.has_line()
    }

    /// Everything not yet consumed: DATA bytes that arrived with the DATA
    /// command go to the DATA decoder, which then has the reader
    /// [`discard`](Self::discard) them.
    pub fn buffered(&self) -> &[u8] {
        &self.buffer[self.start..]
    }

    /// Drops unread input. After STARTTLS, plaintext the client pipelined
    /// must not be executed inside TLS (CVE-2011-0411).
    pub fn discard(&mut self) -> usize {
        self.discarding = false;
        let dropped = self.buffered().len();
        self.buffer.clear();
        self.start = 0;
        dropped
    }

    /// Gives back memory beyond `capacity` that a long line made the
    /// buffer grow to.
    pub fn shrink_to(&mut self, capacity: usize) {
        self.buffer.shrink_to(capacity);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_pipelined_lines() {
        let mut reader = LineReader::new();
        reader.push(b"MAIL FROM:<a@b.c>\r\nRCPT TO:<d@e.f>\r\nDA");
        assert_eq!(
            reader.next_line(),
            Some(Line::Complete(b"MAIL FROM:<a@b.c>"))
        );
        assert_eq!(reader.next_line(), Some(Line::Complete(b"RCPT TO:<d@e.f>")));
        assert_eq!(reader.next_line(), None);
        reader.push(b"TA\n");
        assert_eq!(reader.next_line(), Some(Line::Complete(b"DATA")));
    }

    #[test]
    fn overlong_lines_are_dropped_not_buffered() {
        let mut reader = LineReader::new();
        for _ in 0..100 {
            reader.push(&[b'x'; 1000]);
            assert!(reader.buffer.len() <= MAX_BUFFERED_LINE + 1000);
        }
        assert_eq!(reader.next_line(), None);
        reader.push(b"tail\r\nNOOP\r\n");
        assert_eq!(reader.next_line(), Some(Line::TooLong));
        assert_eq!(reader.next_line(), Some(Line::Complete(b"NOOP")));
    }

    #[test]
    fn an_overlong_tail_behind_a_complete_line_is_dropped_once_the_line_is_read() {
        let mut reader = LineReader::new();
        let mut input = b"NOOP\r\n".to_vec();
        input.extend_from_slice(&[b'x'; MAX_BUFFERED_LINE + 10]);
        reader.push(&input);
        assert_eq!(reader.next_line(), Some(Line::Complete(b"NOOP")));
        assert_eq!(reader.next_line(), None);
        reader.push(b"more x\r\nQUIT\r\n");
        assert!(reader.buffer.len() < 100, "the long tail was kept");
        assert_eq!(reader.next_line(), Some(Line::TooLong));
        assert_eq!(reader.next_line(), Some(Line::Complete(b"QUIT")));
        assert_eq!(reader.next_line(), None);
    }

    #[test]
    fn input_after_the_lines_read_is_what_data_gets() {
        let mut reader = LineReader::new();
        reader.push(b"DATA\r\nSubject: hi\r\n");
        assert_eq!(reader.next_line(), Some(Line::Complete(b"DATA")));
        assert_eq!(reader.buffered(), b"Subject: hi\r\n");
        assert_eq!(reader.discard(), 13);
        assert_eq!(reader.next_line(), None);
    }

    #[test]
    fn discard_and_take() {
        let mut reader = LineReader::new();
        reader.push(b"NOOP\r\nNOOP\r\n");
        assert_eq!(reader.discard(), 12);
        assert_eq!(reader.next_line(), None);
        reader.push(b"body bytes");
        assert_eq!(reader.buffered(), b"body bytes");
    }
}
