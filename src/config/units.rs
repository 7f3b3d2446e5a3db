//! Human-friendly durations ("30s", "5m", "4h", "5d") and sizes ("512KiB",
//! "25MiB") as they appear in the config file. Both print back in the same
//! form, so `check-config` output can be pasted into a config file.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A duration written as a whole number and one unit: `s`, `m`, `h` or `d`.
/// `"0"` is allowed and means "off" where a key documents that.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct HumanDuration(pub Duration);

impl HumanDuration {
    pub const fn secs(secs: u64) -> Self {
        HumanDuration(Duration::from_secs(secs))
    }

    pub fn get(self) -> Duration {
        self.0
    }

    pub fn is_zero(self) -> bool {
        self.0.is_zero()
    }
}

impl std::str::FromStr for HumanDuration {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let bad = || {
            format!(
                "invalid duration {text:?}: write a whole number and a unit, like \"30s\", \"5m\", \"4h\" or \"5d\""
            )
        };
        if text == "0" {
            return Ok(HumanDuration(Duration::ZERO));
        }
        let split = text.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
        let (number, unit) = text.split_at(split);
        let number: u64 = number.parse().map_err(|_| bad())?;
        let unit_secs = match unit {
            "s" => 1,
            "m" => 60,
            "h" => 3600,
            "d" => 86_400,
            _ => return Err(bad()),
        };
        let secs = number
            .checked_mul(unit_secs)
            .ok_or_else(|| format!("duration {text:?} is too large"))?;
        Ok(HumanDuration(Duration::from_secs(secs)))
    }
}

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secs = self.0.as_secs();
        if secs == 0 {
            return f.write_str("0");
        }
        for (unit, size) in [("d", 86_400), ("h", 3600), ("m", 60)] {
            if secs.is_multiple_of(size) {
                return write!(f, "{}{unit}", secs / size);
            }
        }
        write!(f, "{secs}s")
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

impl Serialize for HumanDuration {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// A size in bytes, written as a number with an optional unit:
/// `B`, `KiB`, `MiB`, `GiB` (powers of 1024) or `KB`, `MB`, `GB` (powers of 1000).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl ByteSize {
    pub const fn mib(n: u64) -> Self {
        ByteSize(n * 1024 * 1024)
    }

    pub fn bytes(self) -> u64 {
        self.0
    }
}

impl std::str::FromStr for ByteSize {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let bad = || {
            format!(
                "invalid size {text:?}: write a whole number and a unit, like \"512KiB\", \"25MiB\" or \"1GB\""
            )
        };
        let split = text
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len());
        let (number, unit) = text.split_at(split);
        let number: u64 = number.parse().map_err(|_| bad())?;
        let multiplier = match unit.trim() {
            "" | "B" => 1,
            "KiB" => 1 << 10,
            "MiB" => 1 << 20,
            "GiB" => 1 << 30,
            "KB" | "kB" => 1000,
            "MB" => 1000 * 1000,
            "GB" => 1000 * 1000 * 1000,
            _ => return Err(bad()),
        };
        number
            .checked_mul(multiplier)
            .map(ByteSize)
            .ok_or_else(|| format!("size {text:?} is too large"))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let bytes = self.0;
        for (unit, size) in [("GiB", 1u64 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)] {
            if bytes != 0 && bytes.is_multiple_of(size) {
                return write!(f, "{}{unit}", bytes / size);
            }
        }
        write!(f, "{bytes}B")
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        // Accept a bare integer too: `max_message_size = 1048576` is unambiguous.
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(u64),
            Text(String),
        }
        match Raw::deserialize(deserializer)? {
            Raw::Number(n) => Ok(ByteSize(n)),
            Raw::Text(text) => text.parse().map_err(serde::de::Error::custom),
        }
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_and_print_back() {
        for (text, secs) in [
            ("30s", 30),
            ("5m", 300),
            ("4h", 14_400),
            ("5d", 432_000),
            ("0", 0),
        ] {
            let parsed: HumanDuration = text.parse().unwrap();
            assert_eq!(parsed.get().as_secs(), secs, "{text}");
            assert_eq!(parsed.to_string(), text);
        }
        assert_eq!(HumanDuration::secs(90).to_string(), "90s");
    }

    #[test]
    fn bad_durations_are_refused() {
        for text in [
            "",
            "5",
            "5x",
            "m",
            "-5m",
            "5 m",
            "1.5h",
            "99999999999999999999d",
        ] {
            assert!(text.parse::<HumanDuration>().is_err(), "{text:?}");
        }
    }

    #[test]
    fn sizes_parse_and_print_back() {
        for (text, bytes) in [
            ("512KiB", 512 * 1024),
            ("25MiB", 25 * 1024 * 1024),
            ("1GiB", 1 << 30),
            ("1000B", 1000),
        ] {
            let parsed: ByteSize = text.parse().unwrap();
            assert_eq!(parsed.bytes(), bytes, "{text}");
            assert_eq!(parsed.to_string(), text);
        }
        assert_eq!("10MB".parse::<ByteSize>().unwrap().bytes(), 10_000_000);
        assert_eq!("42".parse::<ByteSize>().unwrap().bytes(), 42);
    }

    #[test]
    fn bad_sizes_are_refused() {
        for text in ["", "MiB", "5XB", "-1", "1.5MiB", "99999999999GiB"] {
            assert!(text.parse::<ByteSize>().is_err(), "{text:?}");
        }
    }
}
