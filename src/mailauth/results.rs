//! The `Authentication-Results:` header field (RFC 8601): what petrel
//! found, under its own hostname as the authserv-id; and the filter that
//! removes such fields when they arrive from outside (RFC 8601 5), since
//! a reader's mail program trusts them only because we add them.

use super::dmarc::DmarcVerdict;
use super::spf::{Identity, SpfVerdict};
use crate::dkim::verify::DkimOutcome;

/// The field, folded one result per line, ending in CRLF.
pub fn header(
    hostname: &str,
    spf: &SpfVerdict,
    dkim: &[DkimOutcome],
    dmarc: &DmarcVerdict,
) -> String {
    let mut results = Vec::new();
    let property = match spf.identity {
        Identity::MailFrom => "smtp.mailfrom",
        Identity::Helo => "smtp.helo",
    };
    results.push(format!(
        "spf={} ({}) {property}={}",
        spf.result.name(),
        comment(&spf.reason),
        value(&spf.domain)
    ));
    if dkim.is_empty() {
        results.push("dkim=none".to_string());
    }
    for outcome in dkim {
        let mut result = format!(
            "dkim={} ({})",
            outcome.result.name(),
            comment(&outcome.reason)
        );
        if !outcome.domain.is_empty() {
            result.push_str(&format!(" header.d={}", value(&outcome.domain)));
        }
        if !outcome.selector.is_empty() {
            result.push_str(&format!(" header.s={}", value(&outcome.selector)));
        }
        if !outcome.signature_start.is_empty() {
            result.push_str(&format!(" header.b={}", value(&outcome.signature_start)));
        }
        results.push(result);
    }
    let mut result = format!("dmarc={}", dmarc.result.name());
    if let Some(policy) = dmarc.policy {
        result.push_str(&format!(" (p={})", policy.name()));
    } else if !dmarc.reason.is_empty() {
        result.push_str(&format!(" ({})", comment(&dmarc.reason)));
    }
    if let Some(domain) = &dmarc.from_domain {
        result.push_str(&format!(" header.from={}", value(domain)));
    }
    results.push(result);
    format!(
        "Authentication-Results: {};\r\n\t{}\r\n",
        value(hostname),
        results.join(";\r\n\t")
    )
}

/// Comment text without anything that could end or escape the comment,
/// and short.
fn comment(text: &str) -> String {
    text.chars()
        .filter(|c| !matches!(c, '(' | ')' | '\\') && (' '..='~').contains(c))
        .take(120)
        .collect()
}

/// RFC 8601 `value`: a token as it is, anything else as a quoted string.
/// Domains and selectors from remote signatures are not trusted to be
/// tokens.
fn value(text: &str) -> String {
    let token = !text.is_empty()
        && text
            .chars()
            .all(|c| c.is_ascii_graphic() && !"()<>@,;:\\\"/[]?=".contains(c) || c == '.');
    if token {
        return text.to_string();
    }
    let inner: String = text
        .chars()
        .filter(|c| (' '..='~').contains(c))
        .flat_map(|c| {
            let escape = matches!(c, '"' | '\\').then_some('\\');
            escape.into_iter().chain(std::iter::once(c))
        })
        .collect();
    format!("\"{inner}\"")
}

/// Removes, as the header section streams past, every
/// `Authentication-Results:` field whose authserv-id is our hostname.
/// Holds one field at a time; a field longer than `max_field` is passed
/// on as it is (the message is refused for its header size anyway).
pub struct ForgedResultsFilter {
    hostname: String,
    max_field: usize,
    /// The field being collected, judged once the next line shows it is
    /// complete.
    field: Vec<u8>,
    at_line_start: bool,
    in_body: bool,
    /// A field too large to hold: passed through until the next one.
    passing: bool,
    removed: usize,
}

impl ForgedResultsFilter {
    pub fn new(hostname: &str, max_field: usize) -> ForgedResultsFilter {
        ForgedResultsFilter {
            hostname: hostname.to_ascii_lowercase(),
            max_field,
            field: Vec::new(),
            at_line_start: true,
            in_body: false,
            passing: false,
            removed: 0,
        }
    }

    /// How many fields were removed.
    pub fn removed(&self) -> usize {
        self.removed
    }

    pub fn push(&mut self, mut input: &[u8], out: &mut Vec<u8>) {
        while !input.is_empty() {
            if self.in_body {
                out.extend_from_slice(input);
                return;
            }
            // A line that does not continue the held field completes it.
            if self.at_line_start && input[0] != b' ' && input[0] != b'\t' {
                self.passing = false;
                if !self.field.is_empty() {
                    self.complete_field(out);
                }
            }
            let end = memchr::memchr(b'\n', input).map_or(input.len(), |at| at + 1);
            let (line, rest) = input.split_at(end);
            input = rest;
            self.at_line_start = line.ends_with(b"\n");
            if self.passing {
                out.extend_from_slice(line);
                continue;
            }
            self.field.extend_from_slice(line);
            if self.at_line_start && (self.field == b"\r\n" || self.field == b"\n") {
                // The empty line: the header section is over.
                out.append(&mut self.field);
                self.in_body = true;
                continue;
            }
            if self.field.len() > self.max_field {
                out.append(&mut self.field);
                self.passing = true;
            }
        }
    }

    /// The end of the message: whatever is held goes out.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        if !self.field.is_empty() {
            self.complete_field(out);
        }
    }

    fn complete_field(&mut self, out: &mut Vec<u8>) {
        if self.is_ours() {
            self.removed += 1;
            self.field.clear();
        } else {
            out.append(&mut self.field);
        }
    }

    /// An Authentication-Results field whose authserv-id is our hostname,
    /// or one whose authserv-id cannot be read for sure (a reader's parser
    /// might find our hostname in it: when in doubt, it goes).
    fn is_ours(&self) -> bool {
        let Some(colon) = self.field.iter().position(|&b| b == b':') else {
            return false;
        };
        let name = String::from_utf8_lossy(&self.field[..colon]);
        if !name.trim().eq_ignore_ascii_case("authentication-results") {
            return false;
        }
        let value = String::from_utf8_lossy(&self.field[colon + 1..]);
        match authserv_id(&value) {
            Some(id) => id.trim_end_matches('.').to_ascii_lowercase() == self.hostname,
            None => true,
        }
    }
}

/// The authserv-id of an Authentication-Results value (RFC 8601 2.2: a
/// `value`, token or quoted-string, after optional CFWS), read with RFC
/// 5322's grammar: comments nest, and a backslash quotes the next
/// character inside comments and quoted strings alike. `None` when it
/// cannot be read for sure: an unclosed comment or string, a stray
/// parenthesis, nothing at all.
fn authserv_id(value: &str) -> Option<String> {
    let mut chars = value.chars().peekable();
    skip_cfws(&mut chars)?;
    let mut id = String::new();
    if chars.peek() == Some(&'"') {
        chars.next();
        loop {
            match chars.next()? {
                '"' => break,
                '\\' => id.push(chars.next()?),
                // Folding inside a quoted string is not part of it.
                '\r' | '\n' => {}
                c => id.push(c),
            }
        }
    } else {
        while let Some(&c) = chars.peek() {
            if c.is_whitespace() || c == ';' || c == '(' {
                break;
            }
            if c == ')' || c == '"' || c == '\\' || c.is_control() {
                return None;
            }
            id.push(c);
            chars.next();
        }
    }
    if id.is_empty() {
        return None;
    }
    // What may follow: CFWS, then a version, a `;` or the end.
    skip_cfws(&mut chars)?;
    Some(id)
}

/// Skips whitespace and (nested) comments; `None` on a comment that never
/// closes, or on a bracket that closes nothing.
fn skip_cfws(chars: &mut std::iter::Peekable<std::str::Chars<'_>>) -> Option<()> {
    loop {
        match chars.peek() {
            Some(c) if c.is_whitespace() => {
                chars.next();
            }
            Some('(') => {
                chars.next();
                let mut depth = 1usize;
                while depth > 0 {
                    match chars.next()? {
                        '\\' => {
                            chars.next()?;
                        }
                        '(' => depth += 1,
                        ')' => depth -= 1,
                        _ => {}
                    }
                }
            }
            Some(')') => return None,
            _ => return Some(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dkim::verify::DkimResult;
    use crate::mailauth::dmarc::{DmarcPolicy, DmarcResult};
    use crate::mailauth::spf::SpfResult;

    fn filtered(input: &[u8], split: usize) -> (Vec<u8>, usize) {
        let mut filter = ForgedResultsFilter::new("MX.test", 1000);
        let mut out = Vec::new();
        filter.push(&input[..split], &mut out);
        filter.push(&input[split..], &mut out);
        filter.finish(&mut out);
        (out, filter.removed())
    }

    #[test]
    fn our_results_are_removed_and_others_kept_at_any_split() {
        let input = b"Authentication-Results: mx.test;\r\n\tdkim=pass header.d=bank.example\r\n\
            Subject: hi\r\n\
            Authentication-Results: (forged) mx.test.; spf=pass\r\n\
            Authentication-Results: other.example; spf=fail\r\n\
            authentication-results :mx.test 1; none\r\n\
            \r\n\
            Authentication-Results: mx.test; in the body, kept\r\n";
        let expected = b"Subject: hi\r\n\
            Authentication-Results: other.example; spf=fail\r\n\
            \r\n\
            Authentication-Results: mx.test; in the body, kept\r\n";
        for split in 0..input.len() {
            let (out, removed) = filtered(input, split);
            assert_eq!(
                String::from_utf8_lossy(&out),
                String::from_utf8_lossy(expected),
                "split at {split}"
            );
            assert_eq!(removed, 3);
        }
    }

    #[test]
    fn authserv_ids_are_read_with_the_whole_cfws_grammar() {
        for (value, id) in [
            (" mx.test; spf=pass", Some("mx.test")),
            (" (\\)) mx.test; dkim=pass", Some("mx.test")),
            (
                " (a (nested (deep)) comment)\r\n\t\"mx.test\" 1; none",
                Some("mx.test"),
            ),
            (" \"mx\\.test\";", Some("mx.test")),
            (" (\\() mx.test;", Some("mx.test")),
            (" other.example (mx.test); spf=pass", Some("other.example")),
            (" (unclosed mx.test; spf=pass", None),
            (" ) mx.test;", None),
            (" \"mx.test;", None),
            (" ;", None),
            ("", None),
        ] {
            assert_eq!(authserv_id(value).as_deref(), id, "{value:?}");
        }
    }

    #[test]
    fn forged_results_never_survive_however_their_comments_are_written() {
        // Structure-aware fuzzing: our authserv-id behind every mix of
        // whitespace, folding and (nested, escaped) comments, in every
        // case and quoting, must be removed; another id behind the same
        // comments must be kept.
        let mut pick = crate::protocol::test_numbers(0x5eed_ab1e);
        let pieces = [
            " ",
            "\t",
            "\r\n ",
            "(x)",
            "(\\))",
            "(\\()",
            "((a)(b))",
            "(\\\\)",
            "(a\\)b)",
            "( mx.test )",
            "(\\\r\n )",
        ];
        for round in 0..3000 {
            let mut cfws = String::new();
            for _ in 0..pick(5) {
                cfws.push_str(pieces[pick(pieces.len())]);
            }
            let ours = [
                "mx.test",
                "MX.TEST",
                "mx.test.",
                "\"mx.test\"",
                "\"mx\\.test\"",
            ][pick(5)];
            let tail = ["; dkim=pass", " 1; spf=pass", ";", " (c); none"][pick(4)];
            let forged = format!("Authentication-Results:{cfws} {ours}{tail}\r\n");
            let message = format!("{forged}Subject: s\r\n\r\nbody\r\n");
            let (out, removed) = filtered(message.as_bytes(), pick(message.len()));
            assert_eq!(removed, 1, "round {round}: {forged:?}");
            assert!(out.starts_with(b"Subject: s"), "round {round}: {forged:?}");
            let other = format!("Authentication-Results:{cfws} other.example{tail}\r\n\r\n");
            let (out, removed) = filtered(other.as_bytes(), pick(other.len()));
            assert_eq!(removed, 0, "round {round}: {other:?}");
            assert_eq!(out, other.as_bytes());
        }
    }

    #[test]
    fn a_message_without_a_body_keeps_its_last_field() {
        let (out, _) = filtered(b"Subject: x\r\nTo: y", 5);
        assert_eq!(out, b"Subject: x\r\nTo: y");
    }

    #[test]
    fn a_huge_field_passes_through_unheld() {
        let mut filter = ForgedResultsFilter::new("mx.test", 10);
        let mut out = Vec::new();
        let input =
            b"X-Long: aaaaaaaaaaaaaaaaaaaaaaa\r\n bbbbbbbbbbbbbbbbbb\r\nSubject: s\r\n\r\nbody";
        for byte in input {
            filter.push(&[*byte], &mut out);
        }
        filter.finish(&mut out);
        assert_eq!(out, input.to_vec());
    }

    #[test]
    fn the_header_names_every_result() {
        let spf = SpfVerdict {
            result: SpfResult::Pass,
            identity: Identity::MailFrom,
            domain: "example.org".into(),
            reason: "example.org gives (pass) for 192.0.2.1".into(),
        };
        let dkim = [DkimOutcome {
            result: DkimResult::Fail,
            domain: "evil; dkim=pass".into(),
            selector: "s1".into(),
            signature_start: "AbCd+/12".into(),
            reason: "body hash did not verify".into(),
        }];
        let dmarc = DmarcVerdict {
            result: DmarcResult::Pass,
            from_domain: Some("example.org".into()),
            policy: Some(DmarcPolicy::Reject),
            reason: String::new(),
        };
        assert_eq!(
            header("mx.test", &spf, &dkim, &dmarc),
            "Authentication-Results: mx.test;\r\n\
             \tspf=pass (example.org gives pass for 192.0.2.1) smtp.mailfrom=example.org;\r\n\
             \tdkim=fail (body hash did not verify) header.d=\"evil; dkim=pass\" header.s=s1 \
             header.b=\"AbCd+/12\";\r\n\
             \tdmarc=pass (p=reject) header.from=example.org\r\n"
        );
    }
}
