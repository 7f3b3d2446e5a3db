//! The SMTP DSN extension's parameters (RFC 3461): what a client asks to
//! be told about (NOTIFY), what a failure report may carry back (RET), and
//! the identifiers it wants quoted in reports (ENVID, ORCPT), with the
//! xtext encoding they travel in. Pure parsing; the reports themselves are
//! built by delivery.

/// RFC 3461 4.1: which outcomes the sender wants reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Notify {
    pub success: bool,
    pub failure: bool,
    pub delay: bool,
}

impl Notify {
    /// No NOTIFY given: failures are reported, delays may be (RFC 3461 4.1).
    pub const DEFAULT: Notify = Notify {
        success: false,
        failure: true,
        delay: true,
    };
    pub const NEVER: Notify = Notify {
        success: false,
        failure: false,
        delay: false,
    };

    /// `NEVER`, or a comma-separated list of SUCCESS, FAILURE and DELAY.
    pub fn parse(value: &str) -> Result<Notify, &'static str> {
        if value.eq_ignore_ascii_case("NEVER") {
            return Ok(Notify::NEVER);
        }
        let mut notify = Notify::NEVER;
        for word in value.split(',') {
            match word.to_ascii_uppercase().as_str() {
                "SUCCESS" => notify.success = true,
                "FAILURE" => notify.failure = true,
                "DELAY" => notify.delay = true,
                _ => return Err("NOTIFY takes NEVER or a list of SUCCESS, FAILURE, DELAY"),
            }
        }
        Ok(notify)
    }

    /// The parameter value, as stored and as relayed to the next hop.
    pub fn to_param(self) -> String {
        let words: Vec<&str> = [
            (self.success, "SUCCESS"),
            (self.failure, "FAILURE"),
            (self.delay, "DELAY"),
        ]
        .into_iter()
        .filter_map(|(on, word)| on.then_some(word))
        .collect();
        if words.is_empty() {
            "NEVER".to_string()
        } else {
            words.join(",")
        }
    }
}

/// RFC 3461 4.3: what a failure report returns of the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ret {
    Full,
    Headers,
}

impl Ret {
    pub fn parse(value: &str) -> Result<Ret, &'static str> {
        match value.to_ascii_uppercase().as_str() {
            "FULL" => Ok(Ret::Full),
            "HDRS" => Ok(Ret::Headers),
            _ => Err("RET takes FULL or HDRS"),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Ret::Full => "FULL",
            Ret::Headers => "HDRS",
        }
    }
}

/// RFC 3461 4.4: ENVID is at most 100 characters (before decoding).
pub const MAX_ENVID: usize = 100;
/// RFC 3461 4.2: ORCPT is at most 500 characters.
pub const MAX_ORCPT: usize = 500;

/// Decodes xtext (RFC 3461 4): `+XX` hex escapes, everything else a
/// printable ASCII character other than `+` and `=`. The result is kept
/// only if it is printable ASCII, because it ends up in report headers.
pub fn xtext_decode(text: &str) -> Result<String, &'static str> {
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut index = 0;
    while index < bytes.len() {
        let byte = bytes[index];
        let decoded = if byte == b'+' {
            let hex = text
                .get(index + 1..index + 3)
                .filter(|h| {
                    h.chars()
                        .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_lowercase())
                })
                .ok_or("bad +XX escape in xtext")?;
            index += 3;
            u8::from_str_radix(hex, 16).map_err(|_| "bad +XX escape in xtext")?
        } else {
            if !(b'!'..=b'~').contains(&byte) || byte == b'=' {
                return Err("invalid character in xtext");
            }
            index += 1;
            byte
        };
        if !(b' '..=b'~').contains(&decoded) {
            return Err("xtext must decode to printable ASCII");
        }
        out.push(char::from(decoded));
    }
    Ok(out)
}

/// Encodes printable ASCII as xtext, for relaying ENVID and ORCPT.
pub fn xtext_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if (b'!'..=b'~').contains(&byte) && byte != b'+' && byte != b'=' {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("+{byte:02X}"));
        }
    }
    out
}

/// `ORCPT=addr-type;xtext`: returns "addr-type;decoded address".
pub fn parse_orcpt(value: &str) -> Result<String, &'static str> {
    if value.len() > MAX_ORCPT {
        return Err("ORCPT is longer than 500 characters");
    }
    let (kind, address) = value
        .split_once(';')
        .ok_or("ORCPT takes addr-type;address")?;
    let valid_kind =
        !kind.is_empty() && kind.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
    if !valid_kind {
        return Err("ORCPT address type must be an atom such as rfc822");
    }
    let address = xtext_decode(address)?;
    if address.is_empty() {
        return Err("ORCPT address is empty");
    }
    Ok(format!("{};{address}", kind.to_ascii_lowercase()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notify_values() {
        assert_eq!(Notify::parse("NEVER"), Ok(Notify::NEVER));
        let all = Notify::parse("success,Failure,DELAY").unwrap();
        assert!(all.success && all.failure && all.delay);
        assert_eq!(all.to_param(), "SUCCESS,FAILURE,DELAY");
        assert_eq!(Notify::parse("FAILURE").unwrap().to_param(), "FAILURE");
        assert_eq!(Notify::NEVER.to_param(), "NEVER");
        assert!(Notify::parse("NEVER,FAILURE").is_err());
        assert!(Notify::parse("SOMETIMES").is_err());
        assert!(Notify::parse("").is_err());
    }

    #[test]
    fn xtext_round_trip() {
        assert_eq!(xtext_decode("a+2Bb+3Dc").unwrap(), "a+b=c");
        assert_eq!(xtext_encode("a+b=c d"), "a+2Bb+3Dc+20d");
        assert_eq!(xtext_decode(&xtext_encode("x y+z=")).unwrap(), "x y+z=");
        assert!(xtext_decode("bad+2").is_err());
        assert!(xtext_decode("bad+2b").is_err(), "hex is upper case");
        assert!(xtext_decode("a=b").is_err());
        assert!(xtext_decode("+0A").is_err(), "no control characters");
    }

    #[test]
    fn orcpt() {
        assert_eq!(
            parse_orcpt("rfc822;Alice+40example.com").unwrap(),
            "rfc822;Alice@example.com"
        );
        assert_eq!(
            parse_orcpt("RFC822;bob@example.org").unwrap(),
            "rfc822;bob@example.org"
        );
        assert!(parse_orcpt("bob@example.org").is_err());
        assert!(parse_orcpt("rfc822;").is_err());
        assert!(parse_orcpt(&format!("rfc822;{}", "a".repeat(600))).is_err());
    }
}
