//! App passwords: SMTP AUTH cannot carry a second factor, so each device
//! gets its own generated password, revocable alone, and the main password
//! can be kept out of SMTP (`[auth] require_app_passwords`).
//!
//! An app password is 24 random lower-case letters, shown in groups of
//! four (`abcd efgh ijkl mnop qrst uvwx`) and accepted with or without the
//! spaces, in any case. The first group is its *selector*, stored in clear:
//! a login looks up the one app password it can be and checks one hash,
//! never one per device (which would let each attempt cost many). The other
//! 20 letters (94 bits) are the secret; the hash covers all 24.

use ring::rand::{SecureRandom as _, SystemRandom};

/// Letters in an app password.
pub const LENGTH: usize = 24;
/// Letters shown together, and the selector's length.
const GROUP: usize = 4;
/// The longest label; it appears in logs and `Received:` headers.
const MAX_LABEL: usize = 32;

/// A new app password: `display` is shown once, then only the hash and
/// the selector are kept.
pub struct Generated {
    pub display: String,
    pub selector: String,
    pub hash: String,
}

/// Draws a new app password. Fails (rather than falling back to anything
/// weaker) when the system's random source does.
pub fn generate() -> Result<Generated, String> {
    let letters = random_letters()?;
    let hash = super::password::hash(&letters)?;
    Ok(Generated {
        display: display(&letters),
        selector: selector(&letters).to_string(),
        hash,
    })
}

fn random_letters() -> Result<String, String> {
    let random = SystemRandom::new();
    let mut letters = String::with_capacity(LENGTH);
    // 234 = 9 * 26: bytes from 234 up are drawn again, so every letter is
    // equally likely.
    let mut bytes = [0u8; 64];
    while letters.len() < LENGTH {
        random
            .fill(&mut bytes)
            .map_err(|_| "the system's random source failed".to_string())?;
        for &byte in bytes
            .iter()
            .filter(|&&b| b < 234)
            .take(LENGTH - letters.len())
        {
            letters.push(char::from(b'a' + byte % 26));
        }
    }
    Ok(letters)
}

/// `abcdefgh…` as `abcd efgh …`.
fn display(letters: &str) -> String {
    letters
        .as_bytes()
        .chunks(GROUP)
        .map(|group| String::from_utf8_lossy(group).into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// The letters of what a client typed, if it can be an app password:
/// spaces and hyphens dropped, lower-cased.
pub fn normalize(typed: &str) -> Option<String> {
    if typed.len() > LENGTH * 3 {
        return None;
    }
    let letters: String = typed
        .chars()
        .filter(|c| !matches!(c, ' ' | '-'))
        .map(|c| c.to_ascii_lowercase())
        .collect();
    (letters.len() == LENGTH && letters.bytes().all(|b| b.is_ascii_lowercase())).then_some(letters)
}

/// The public part of normalized letters.
pub fn selector(letters: &str) -> &str {
    letters.get(..GROUP).unwrap_or(letters)
}

/// A label names a device in logs and headers: short, plain characters.
pub fn check_label(label: &str) -> Result<(), String> {
    let plain = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    if label.is_empty() || label.len() > MAX_LABEL || !label.chars().all(plain) {
        return Err(format!(
            "{label:?} is not a label: use 1 to {MAX_LABEL} letters, digits, '.', '_' or '-' \
             (e.g. phone, laptop-2)"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_passwords_are_24_letters_in_groups_and_verify() {
        let generated = generate().unwrap();
        assert_eq!(generated.display.len(), LENGTH + 5);
        assert_eq!(generated.display.split(' ').count(), 6);
        let letters = normalize(&generated.display).unwrap();
        assert_eq!(selector(&letters), generated.selector);
        assert!(super::super::password::verify(&letters, &generated.hash));
        let other = generate().unwrap();
        assert_ne!(generated.display, other.display);
    }

    #[test]
    fn letters_are_spread_evenly() {
        // 24 000 letters: each of 26 should appear about 923 times; a
        // modulo bias or a stuck generator would show far outside this.
        let mut counts = [0u32; 26];
        for _ in 0..1000 {
            let generated = random_letters().unwrap();
            for b in generated.bytes() {
                counts[usize::from(b - b'a')] += 1;
            }
        }
        assert!(
            counts.iter().all(|&n| (750..1100).contains(&n)),
            "{counts:?}"
        );
    }

    #[test]
    fn typed_forms_are_accepted_and_others_are_not_app_passwords() {
        let letters = "abcdefghijklmnopqrstuvwx";
        assert_eq!(normalize(letters).as_deref(), Some(letters));
        assert_eq!(
            normalize("ABCD efgh-ijkl mnop qrst uvwx").as_deref(),
            Some(letters)
        );
        assert_eq!(normalize("abcdefghijklmnopqrstuvw"), None, "too short");
        assert_eq!(normalize("abcdefghijklmnopqrstuvw1"), None, "a digit");
        assert_eq!(normalize("Correct-Horse-Battery-9!"), None);
        assert_eq!(normalize(&"a ".repeat(200)), None, "bounded work");
        assert_eq!(selector(letters), "abcd");
    }

    #[test]
    fn labels() {
        assert!(check_label("phone").is_ok());
        assert!(check_label("laptop-2.work_old").is_ok());
        assert!(check_label("").is_err());
        assert!(check_label("my phone").is_err());
        assert!(check_label("x\r\nBcc: y").is_err());
        assert!(check_label(&"a".repeat(33)).is_err());
    }
}
