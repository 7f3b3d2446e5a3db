//! Text from the network made safe to print: a remote server's reply, a
//! header, a HELO name or an address may carry control characters (ESC
//! sequences rewrite an operator's terminal title or hide log lines), so
//! every such character is shown as a `\x1b`-style escape instead, in log
//! lines and in CLI output alike.

use std::borrow::Cow;
use std::fmt::Write as _;

/// `text` with control characters (and backslashes, so the escape is
/// unambiguous) escaped; borrowed when nothing needed escaping.
pub fn escape(text: &str) -> Cow<'_, str> {
    if !text.chars().any(needs_escape) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            c if needs_escape(c) => {
                let _ = write!(out, "\\x{:02x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// Bytes (a header section, say), decoded leniently, then escaped; line
/// breaks are kept so multi-line output stays readable.
pub fn escape_lines(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes)
        .split('\n')
        .map(|line| escape(line.strip_suffix('\r').unwrap_or(line)).into_owned())
        .collect::<Vec<_>>()
        .join("\n")
}

/// Tabs are printable (header folding is made of them); other control
/// characters are not.
fn needs_escape(c: char) -> bool {
    (c.is_control() && c != '\t') || c == '\\'
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(escape("plain text"), "plain text");
        assert!(matches!(escape("plain"), Cow::Borrowed(_)));
        assert_eq!(
            escape("451 \u{1b}]0;pwned\u{7} try later"),
            "451 \\x1b]0;pwned\\x07 try later"
        );
        assert_eq!(escape("a\r\nb\tc"), "a\\x0d\\x0ab\tc");
        assert_eq!(escape("back\\slash"), "back\\\\slash");
        assert_eq!(escape("naïve ünïcode"), "naïve ünïcode");
        assert_eq!(escape("\u{9b}31m"), "\\x9b31m", "C1 controls too");
        assert_eq!(
            escape_lines(b"Subject: \x1b[2Jhi\r\nFrom: a\r\n"),
            "Subject: \\x1b[2Jhi\nFrom: a\n"
        );
    }
}
