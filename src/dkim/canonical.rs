//! DKIM "relaxed" canonicalization (RFC 6376 3.4.2 and 3.4.4): the form
//! of a message that survives the re-folding and whitespace changes later
//! hops make. The body is canonicalized as it streams past, so no message
//! is ever held whole.

/// Space and horizontal tab (RFC 5234 WSP).
fn is_wsp(byte: u8) -> bool {
    byte == b' ' || byte == b'\t'
}

/// A header field as it is hashed: name in lower case, value unfolded,
/// runs of whitespace as one space, none at either end of the value, and
/// CRLF at the end. `field` is the whole field, folded as it came.
pub fn relaxed_header(field: &[u8]) -> Vec<u8> {
    let colon = field.iter().position(|&b| b == b':').unwrap_or(field.len());
    let (name, value) = field.split_at(colon);
    let value = value.get(1..).unwrap_or_default();
    let mut out: Vec<u8> = name
        .iter()
        .filter(|&&b| !is_wsp(b))
        .map(u8::to_ascii_lowercase)
        .collect();
    out.push(b':');
    let mut space = false;
    let mut started = false;
    for &byte in value {
        match byte {
            b'\r' | b'\n' => {}
            b if is_wsp(b) => space = true,
            b => {
                if space && started {
                    out.push(b' ');
                }
                space = false;
                started = true;
                out.push(b);
            }
        }
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// Relaxed body canonicalization, fed in any chunks: whitespace runs
/// become one space, whitespace at line ends goes, empty lines at the end
/// go, and a body that has content ends with CRLF.
#[derive(Debug, Default)]
pub struct RelaxedBody {
    /// Empty lines seen and not yet written: written only when a line
    /// with content follows them.
    blank_lines: usize,
    /// The current line has had something other than whitespace.
    content: bool,
    /// Whitespace seen since the last content octet.
    space: bool,
    /// A CR that may be the start of a CRLF.
    cr: bool,
}

impl RelaxedBody {
    /// Canonicalizes `chunk` into `out` (appended).
    pub fn push(&mut self, chunk: &[u8], out: &mut Vec<u8>) {
        for &byte in chunk {
            if self.cr {
                self.cr = false;
                if byte == b'\n' {
                    self.end_line(out);
                    continue;
                }
                // A CR on its own is an ordinary octet.
                self.octet(b'\r', out);
            }
            match byte {
                b'\r' => self.cr = true,
                b'\n' => self.end_line(out),
                b if is_wsp(b) => self.space = true,
                b => self.octet(b, out),
            }
        }
    }

    /// The end of the body: completes a last line without CRLF.
    pub fn finish(mut self, out: &mut Vec<u8>) {
        if self.cr {
            self.cr = false;
            self.octet(b'\r', out);
        }
        if self.content {
            out.extend_from_slice(b"\r\n");
        }
    }

    fn octet(&mut self, byte: u8, out: &mut Vec<u8>) {
        if !self.content {
            for _ in 0..self.blank_lines {
                out.extend_from_slice(b"\r\n");
            }
            self.blank_lines = 0;
            self.content = true;
        }
        if self.space {
            out.push(b' ');
            self.space = false;
        }
        out.push(byte);
    }

    fn end_line(&mut self, out: &mut Vec<u8>) {
        if self.content {
            out.extend_from_slice(b"\r\n");
        } else {
            self.blank_lines += 1;
        }
        self.content = false;
        self.space = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(input: &[u8]) -> Vec<u8> {
        let mut canonical = RelaxedBody::default();
        let mut out = Vec::new();
        canonical.push(input, &mut out);
        canonical.finish(&mut out);
        out
    }

    /// RFC 6376 3.4.6, the example's body.
    #[test]
    fn the_rfc_example_body() {
        assert_eq!(body(b" C \r\nD \t E\r\n\r\n\r\n"), b" C\r\nD E\r\n");
    }

    /// RFC 6376 3.4.6, the example's headers.
    #[test]
    fn the_rfc_example_headers() {
        assert_eq!(relaxed_header(b"A: X\r\n"), b"a:X\r\n");
        assert_eq!(relaxed_header(b"B : Y\t\r\n\tZ  \r\n"), b"b:Y Z\r\n");
        assert_eq!(
            relaxed_header(b"Subject: Re:  hi\r\n"),
            b"subject:Re: hi\r\n"
        );
    }

    #[test]
    fn body_edge_cases() {
        assert_eq!(body(b""), b"");
        assert_eq!(body(b"\r\n\r\n"), b"");
        assert_eq!(body(b"no newline"), b"no newline\r\n");
        assert_eq!(body(b"a\r\n  \r\nb"), b"a\r\n\r\nb\r\n");
        assert_eq!(body(b"x\ry\r\n"), b"x\ry\r\n");
    }

    #[test]
    fn any_split_canonicalizes_alike() {
        let input = b"  lead\t and  trail \t\r\n\r\n \r\nmid\rcr\r\n\r\n\r\n";
        let whole = body(input);
        for split in 0..input.len() {
            let mut canonical = RelaxedBody::default();
            let mut out = Vec::new();
            canonical.push(&input[..split], &mut out);
            canonical.push(&input[split..], &mut out);
            canonical.finish(&mut out);
            assert_eq!(out, whole, "split at {split}");
        }
    }
}
