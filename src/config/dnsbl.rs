//! DNS block and allow lists as the config names them, in Postfix
//! postscreen's syntax: `zone[=filter][*weight]`.

use std::net::{IpAddr, Ipv4Addr};

/// One DNS list as configured: `zone[=filter][*weight]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blocklist {
    pub zone: String,
    /// The answers that count, one set of values per octet; `None`: any.
    filter: Option<[Vec<(u8, u8)>; 4]>,
    /// Negative for allowlists.
    pub weight: i32,
}

impl Blocklist {
    /// Postscreen's syntax: `zen.spamhaus.org*2`,
    /// `list.dnswl.org=127.0.[0..255].[1..3]*-3`, `bl.example=127.0.0.[2;4;10..11]`.
    pub fn parse(text: &str) -> Result<Blocklist, String> {
        let (rest, weight) = match text.rsplit_once('*') {
            Some((rest, weight)) => {
                let weight = weight
                    .trim()
                    .parse::<i32>()
                    .map_err(|_| format!("{text:?}: the weight after * must be a whole number"))?;
                (rest, weight)
            }
            None => (text, 1),
        };
        let (zone, filter) = match rest.split_once('=') {
            Some((zone, filter)) => (
                zone,
                Some(parse_filter(filter).map_err(|why| format!("{text:?}: {why}"))?),
            ),
            None => (rest, None),
        };
        let zone = zone.trim().trim_end_matches('.').to_ascii_lowercase();
        let plausible = !zone.is_empty()
            && zone.contains('.')
            && zone
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
        if !plausible {
            return Err(format!("{text:?}: {zone:?} is not a DNS zone"));
        }
        Ok(Blocklist {
            zone,
            filter,
            weight,
        })
    }

    /// The name to ask for `ip`: its octets (IPv4) or nibbles (IPv6)
    /// reversed, under the zone.
    pub fn query_name(&self, ip: IpAddr) -> String {
        let reversed: Vec<String> = match ip {
            IpAddr::V4(v4) => v4.octets().iter().rev().map(u8::to_string).collect(),
            IpAddr::V6(v6) => v6
                .octets()
                .iter()
                .rev()
                .flat_map(|byte| [byte & 0x0f, byte >> 4])
                .map(|nibble| format!("{nibble:x}"))
                .collect(),
        };
        format!("{}.{}", reversed.join("."), self.zone)
    }

    /// Whether an answer counts as a listing under the filter.
    pub fn counts(&self, answer: Ipv4Addr) -> bool {
        let Some(filter) = &self.filter else {
            return true;
        };
        answer.octets().iter().zip(filter).all(|(octet, ranges)| {
            ranges
                .iter()
                .any(|(low, high)| (*low..=*high).contains(octet))
        })
    }
}

/// `127.0.0.[2..11]`: four octets, each a number or a bracketed list of
/// numbers and ranges separated by `;`.
fn parse_filter(text: &str) -> Result<[Vec<(u8, u8)>; 4], String> {
    // Dots inside brackets are ranges (`[1..3]`), not octet separators.
    let mut octets = Vec::new();
    let (mut depth, mut start) = (0usize, 0usize);
    let text = text.trim();
    for (at, c) in text.char_indices() {
        match c {
            '[' => depth += 1,
            ']' => depth = depth.saturating_sub(1),
            '.' if depth == 0 => {
                octets.push(&text[start..at]);
                start = at + 1;
            }
            _ => {}
        }
    }
    octets.push(&text[start..]);
    let [a, b, c, d] = octets.as_slice() else {
        return Err(format!("the filter {text:?} must have four octets"));
    };
    let octet = |part: &str| -> Result<Vec<(u8, u8)>, String> {
        let number = |n: &str| {
            n.trim()
                .parse::<u8>()
                .map_err(|_| format!("{n:?} in the filter {text:?} is not a number from 0 to 255"))
        };
        let Some(inner) = part.strip_prefix('[').and_then(|p| p.strip_suffix(']')) else {
            let n = number(part)?;
            return Ok(vec![(n, n)]);
        };
        inner
            .split(';')
            .map(|item| match item.split_once("..") {
                Some((low, high)) => {
                    let (low, high) = (number(low)?, number(high)?);
                    if low > high {
                        return Err(format!("{item:?} in the filter {text:?} runs backwards"));
                    }
                    Ok((low, high))
                }
                None => number(item).map(|n| (n, n)),
            })
            .collect()
    };
    Ok([octet(a)?, octet(b)?, octet(c)?, octet(d)?])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_parse_as_postscreen_writes_them() {
        let zen = Blocklist::parse("zen.spamhaus.org*2").unwrap();
        assert_eq!(
            (zen.zone.as_str(), zen.weight, zen.filter.is_none()),
            ("zen.spamhaus.org", 2, true)
        );
        let dnswl = Blocklist::parse("list.dnswl.org=127.0.[0..255].[1..3]*-3").unwrap();
        assert_eq!(dnswl.weight, -3);
        assert!(dnswl.counts(Ipv4Addr::new(127, 0, 10, 2)));
        assert!(!dnswl.counts(Ipv4Addr::new(127, 0, 10, 0)));
        assert!(!dnswl.counts(Ipv4Addr::new(127, 1, 10, 2)));
        let listed = Blocklist::parse("bl.example.test=127.0.0.[2;4;10..11]").unwrap();
        assert_eq!(listed.weight, 1);
        for (last, counts) in [
            (2, true),
            (3, false),
            (4, true),
            (10, true),
            (11, true),
            (12, false),
        ] {
            assert_eq!(
                listed.counts(Ipv4Addr::new(127, 0, 0, last)),
                counts,
                "{last}"
            );
        }
        for bad in [
            "",
            "nodots",
            "bl.example=127.0.0",
            "bl.example=127.0.0.[5..2]",
            "bl.example=127.0.0.300",
            "bl.example*two",
            "bad zone.example",
        ] {
            assert!(Blocklist::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn query_names_reverse_the_address() {
        let list = Blocklist::parse("bl.example.test").unwrap();
        assert_eq!(
            list.query_name("192.0.2.99".parse().unwrap()),
            "99.2.0.192.bl.example.test"
        );
        assert_eq!(
            list.query_name("2001:db8::1".parse().unwrap()),
            "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.bl.example.test"
        );
    }
}
