//! Passwords: the policy a new password must meet, and argon2id hashing in
//! PHC string format. A password is never stored, logged or compared in
//! clear.

use std::fmt;

use argon2::Argon2;
use argon2::password_hash::PasswordHasher;

use crate::config::PasswordPolicyConfig;

/// Bounds the work one login attempt can cause; no real password is longer.
pub const MAX_PASSWORD_LENGTH: usize = 1024;

/// Why a password was refused: each entry tells the user what to change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PasswordRefused {
    pub problems: Vec<String>,
}

impl fmt::Display for PasswordRefused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("password refused:")?;
        for problem in &self.problems {
            write!(f, "\n  - {problem}")?;
        }
        Ok(())
    }
}

impl std::error::Error for PasswordRefused {}

/// Checks a new password for `address` against the policy.
pub fn check_policy(
    policy: &PasswordPolicyConfig,
    password: &str,
    address: &str,
) -> Result<(), PasswordRefused> {
    let mut problems = Vec::new();
    let length = password.chars().count();
    if length < policy.min_length {
        problems.push(format!(
            "use at least {} characters (this one has {length})",
            policy.min_length
        ));
    }
    if length > MAX_PASSWORD_LENGTH {
        problems.push(format!("use at most {MAX_PASSWORD_LENGTH} characters"));
    }
    if policy.require_upper && !password.chars().any(char::is_uppercase) {
        problems.push("add an upper-case letter".into());
    }
    if policy.require_lower && !password.chars().any(char::is_lowercase) {
        problems.push("add a lower-case letter".into());
    }
    if policy.require_digit && !password.chars().any(|c| c.is_ascii_digit()) {
        problems.push("add a digit".into());
    }
    if policy.require_symbol && !password.chars().any(|c| !c.is_alphanumeric()) {
        problems.push("add a symbol, such as ! % - _ or a space".into());
    }
    // A login of that form is checked as an app password only.
    if super::app_passwords::normalize(password).is_some() {
        problems.push(format!(
            "do not use {} letters alone: that is the form of an app password",
            super::app_passwords::LENGTH
        ));
    }
    let lower = password.to_lowercase();
    let local_part = address.split('@').next().unwrap_or(address).to_lowercase();
    if lower.contains(&address.to_lowercase())
        || (local_part.len() >= 3 && lower.contains(&local_part))
    {
        problems.push(format!("do not build it from your address ({local_part})"));
    }
    if problems.is_empty() {
        // The estimator also sees the address, so "Alice2024!" style
        // passwords for alice@ score as weak as they are.
        let mut hints: Vec<&str> = vec![address, &local_part];
        hints.extend(address.split(['@', '.']).filter(|part| part.len() >= 3));
        let estimate = zxcvbn::zxcvbn(password, &hints);
        if u8::from(estimate.score()) < policy.min_strength {
            let mut problem = String::from("too easy to guess");
            if let Some(feedback) = estimate.feedback() {
                if let Some(warning) = feedback.warning() {
                    problem.push_str(&format!(": {warning}"));
                }
                let suggestions: Vec<String> = feedback
                    .suggestions()
                    .iter()
                    .map(ToString::to_string)
                    .collect();
                if !suggestions.is_empty() {
                    problem.push_str(&format!(" ({})", suggestions.join(" ")));
                }
            } else {
                problem.push_str("; add another word or two that are not common phrases");
            }
            problems.push(problem);
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(PasswordRefused { problems })
    }
}

/// argon2id with the crate's defaults (m=19 MiB, t=2, p=1: the OWASP
/// baseline) and a random salt, as a PHC string.
pub fn hash(password: &str) -> Result<String, String> {
    Argon2::default()
        .hash_password(password.as_bytes())
        .map(|hash| hash.to_string())
        .map_err(|e| format!("cannot hash password: {e}"))
}

/// True when `password` matches the stored PHC string (for the command
/// line; the server checks through [`super::HashingPool`], which bounds
/// how many run at once).
pub fn verify(password: &str, stored: &str) -> bool {
    super::hashing::matches(password, stored, &mut Vec::new())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(password: &str) -> Result<(), PasswordRefused> {
        check_policy(
            &PasswordPolicyConfig::default(),
            password,
            "alice@example.com",
        )
    }

    #[test]
    fn refused_passwords_say_what_to_change() {
        let table = [
            ("Sh0rt!pw", "at least 12 characters"),
            ("nouppercase-letters-9", "upper-case letter"),
            ("NOLOWERCASE-LETTERS-9", "lower-case letter"),
            ("No-Digits-In-This-One", "a digit"),
            ("NoSymbolsHere123abc", "a symbol"),
            ("Password123!", "too easy to guess"),
            ("Qwerty123456!", "too easy to guess"),
            ("Alice@Example.com1", "from your address"),
            ("Alice-2024-Summer!", "from your address"),
            ("Aaaaaaaaaaa1!", "too easy to guess"),
        ];
        for (password, expected) in table {
            let refused = check(password).expect_err(password);
            let text = refused.to_string();
            assert!(text.contains(expected), "{password}: {text}");
        }
    }

    #[test]
    fn strong_passwords_pass() {
        for password in [
            "correct-Horse-battery-9-staple",
            "Tr0ub4dor&3-xkcd-Zebra",
            "4 quiet Lanterns over Brno!",
        ] {
            assert_eq!(check(password), Ok(()), "{password}");
        }
    }

    #[test]
    fn policy_is_configurable() {
        let relaxed = PasswordPolicyConfig {
            min_length: 8,
            require_upper: false,
            require_lower: true,
            require_digit: false,
            require_symbol: false,
            min_strength: 0,
        };
        assert!(check_policy(&relaxed, "lowercase", "bob@example.com").is_ok());
        assert!(check_policy(&relaxed, "short", "bob@example.com").is_err());
        let refused = check_policy(&relaxed, "lantern harbour quiet sunny", "bob@example.com")
            .expect_err("24 letters and spaces");
        assert!(refused.to_string().contains("form of an app password"));
    }

    #[test]
    fn hashes_are_argon2id_phc_and_verify() {
        let stored = hash("correct-Horse-battery-9-staple").unwrap();
        assert!(stored.starts_with("$argon2id$v=19$"), "{stored}");
        assert!(!stored.contains("correct-Horse"));
        assert!(verify("correct-Horse-battery-9-staple", &stored));
        assert!(!verify("correct-horse-battery-9-staple", &stored));
        assert!(!verify("anything", "not a phc string"));
        assert_ne!(hash("same").unwrap(), hash("same").unwrap(), "salted");
    }
}
