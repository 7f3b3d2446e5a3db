//! Checks every key of a parsed config and reports every problem found,
//! not only the first (one error hid the others): one function per
//! section, each adding what it finds to one list.

use std::collections::BTreeMap;

use super::MilterAddress;
use super::{
    AliasTargets, AntispamConfig, AuthConfig, Blocklist, Config, ConfigError, DeliveryConfig,
    DnsConfig, HumanDuration, LimitsConfig, MilterConfig, QueueConfig, TlsConfig,
    parse_fingerprint, parse_host_port,
};
use crate::protocol::address::{Address, Domain};

/// What is wrong so far, with the checks every section uses.
#[derive(Default)]
struct Problems(Vec<ConfigError>);

impl Problems {
    fn at(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.0.push(ConfigError::at(key, message));
    }

    fn at_least_one(&mut self, values: &[(&str, usize)]) {
        for (key, value) in values {
            if *value == 0 {
                self.at(*key, "must be at least 1");
            }
        }
    }

    fn more_than_zero(&mut self, values: &[(&str, HumanDuration)]) {
        for (key, value) in values {
            if value.is_zero() {
                self.at(*key, "must be more than 0");
            }
        }
    }
}

impl Config {
    /// Normalizes what has a canonical form (domains, aliases) and checks
    /// every section.
    pub(super) fn normalize_and_validate(&mut self) -> Result<(), ConfigError> {
        let mut problems = Problems::default();
        self.check_top_level(&mut problems);
        self.normalize_aliases(&mut problems);
        self.tls.check(&mut problems);
        self.delivery.check(&mut problems);
        self.dns.check(&mut problems);
        self.queue.check(&mut problems);
        self.limits.check(&mut problems);
        self.auth.check(&mut problems);
        self.antispam.check(&mut problems);
        for (index, milter) in self.milter.iter().enumerate() {
            milter.check(index, &mut problems);
        }
        ConfigError::of_all(problems.0)
    }

    fn check_top_level(&mut self, problems: &mut Problems) {
        if Domain::parse(&self.hostname).is_err() {
            problems.at(
                "hostname",
                format!("{:?} is not a valid host name", self.hostname),
            );
        }
        if self.data_dir.as_os_str().is_empty() {
            problems.at("data_dir", "must not be empty");
        }
        for (index, domain) in self.domains.local.iter_mut().enumerate() {
            match Domain::parse(domain) {
                Ok(parsed) => *domain = parsed.to_string(),
                Err(e) => problems.at(
                    format!("domains.local[{index}]"),
                    format!("{domain:?}: {e}"),
                ),
            }
        }
    }

    /// Aliases keyed by their lookup form, targets in canonical form.
    fn normalize_aliases(&mut self, problems: &mut Problems) {
        let mut aliases = BTreeMap::new();
        for (from, targets) in &self.aliases {
            let key = format!("aliases.{from:?}");
            let source = match Address::parse(from) {
                Ok(source) => source,
                Err(e) => {
                    problems.at(&key, format!("{from:?} is not an address: {e}"));
                    continue;
                }
            };
            if !self.is_local_domain(source.domain()) {
                problems.at(
                    &key,
                    format!(
                        "{from:?} is not in a local domain (domains.local); only local addresses can be aliases"
                    ),
                );
            }
            let mut normalized = Vec::new();
            for target in targets.as_slice() {
                match Address::parse(target) {
                    Ok(parsed) => normalized.push(parsed.to_string()),
                    Err(e) => {
                        problems.at(&key, format!("target {target:?} is not an address: {e}"))
                    }
                }
            }
            if targets.as_slice().is_empty() {
                problems.at(&key, "needs at least one target address");
            }
            aliases.insert(source.mailbox_key(), AliasTargets::Many(normalized));
        }
        self.aliases = aliases;
    }
}

impl TlsConfig {
    fn check(&self, problems: &mut Problems) {
        match (&self.cert, &self.key) {
            (Some(_), None) => {
                problems.at("tls.key", "tls.cert is set, so tls.key must be set too")
            }
            (None, Some(_)) => {
                problems.at("tls.cert", "tls.key is set, so tls.cert must be set too")
            }
            _ => {}
        }
    }
}

impl DeliveryConfig {
    fn check(&self, problems: &mut Problems) {
        if let Some(smarthost) = &self.smarthost
            && let Err(e) = parse_host_port(smarthost)
        {
            problems.at("delivery.smarthost", e);
        }
        if let Some(fingerprint) = &self.smarthost_fingerprint
            && let Err(e) = parse_fingerprint(fingerprint)
        {
            problems.at("delivery.smarthost_fingerprint", e);
        }
        if self.smarthost_user.is_some() != self.smarthost_password_file.is_some() {
            problems.at(
                "delivery.smarthost_password_file",
                "smarthost_user and smarthost_password_file go together",
            );
        }
        if self.port == 0 {
            problems.at("delivery.port", "must be a port number from 1 to 65535");
        }
        problems.at_least_one(&[
            ("delivery.workers", self.workers),
            (
                "delivery.destination_concurrency",
                self.destination_concurrency,
            ),
            ("delivery.local_workers", self.local_workers),
        ]);
        problems.more_than_zero(&[
            ("delivery.connect_timeout", self.connect_timeout),
            ("delivery.reply_timeout", self.reply_timeout),
            ("delivery.attempt_timeout", self.attempt_timeout),
        ]);
    }
}

impl DnsConfig {
    fn check(&self, problems: &mut Problems) {
        problems.more_than_zero(&[("dns.timeout", self.timeout)]);
    }
}

impl QueueConfig {
    fn check(&self, problems: &mut Problems) {
        problems.more_than_zero(&[
            ("queue.max_age", self.max_age),
            ("queue.retry_min", self.retry_min),
            ("queue.retry_max", self.retry_max),
        ]);
        if self.retry_min > self.retry_max {
            problems.at(
                "queue.retry_min",
                format!(
                    "{} is more than queue.retry_max ({})",
                    self.retry_min, self.retry_max
                ),
            );
        }
    }
}

impl LimitsConfig {
    fn check(&self, problems: &mut Problems) {
        problems.at_least_one(&[
            ("limits.max_recipients", self.max_recipients),
            ("limits.max_sessions", self.max_sessions),
            ("limits.max_sessions_per_ip", self.max_sessions_per_ip),
            ("limits.max_local_sessions", self.max_local_sessions),
            (
                "limits.max_local_sessions_per_user",
                self.max_local_sessions_per_user,
            ),
        ]);
        if self.max_local_sessions > 1_000 {
            problems.at(
                "limits.max_local_sessions",
                "more than 1000 local sessions at once is not what this server is built for",
            );
        }
        if self.max_sessions > 10_000 {
            problems.at(
                "limits.max_sessions",
                "more than 10000 threads is not what this server is built for",
            );
        }
        if self.min_data_rate.bytes() == 0 {
            problems.at("limits.min_data_rate", "must be more than 0");
        }
        self.check_sizes(problems);
        problems.more_than_zero(&[
            ("limits.command_timeout", self.command_timeout),
            ("limits.data_timeout", self.data_timeout),
            ("limits.session_timeout", self.session_timeout),
        ]);
    }

    fn check_sizes(&self, problems: &mut Problems) {
        if self.max_line_length.bytes() < 1000 {
            problems.at(
                "limits.max_line_length",
                "must be at least 1000 (RFC 5321's own limit)",
            );
        }
        if self.max_header_size.bytes() < 1024 {
            problems.at("limits.max_header_size", "must be at least 1KiB");
        }
        if self.max_hops == 0 {
            problems.at("limits.max_hops", "must be at least 1");
        }
        if self.max_message_size.bytes() < 1024 {
            problems.at("limits.max_message_size", "must be at least 1KiB");
        }
        if self.max_message_size.bytes() > 1 << 30 {
            problems.at(
                "limits.max_message_size",
                "more than 1GiB cannot be held in the queue database",
            );
        }
    }
}

/// More lists than this cost every new client too many queries.
const MAX_DNS_LISTS: usize = 16;

impl AntispamConfig {
    fn check(&self, problems: &mut Problems) {
        problems.more_than_zero(&[
            ("antispam.greet_wait", self.greet_wait),
            ("antispam.pass_ttl", self.pass_ttl),
            ("antispam.dnsbl_timeout", self.dnsbl_timeout),
        ]);
        if self.greet_wait.get() > std::time::Duration::from_secs(30) {
            problems.at(
                "antispam.greet_wait",
                "more than 30s keeps real senders waiting (postscreen's default is 6s)",
            );
        }
        if self.dnsbl.len() > MAX_DNS_LISTS {
            problems.at(
                "antispam.dnsbl",
                format!("more than {MAX_DNS_LISTS} lists cost each new client too many queries"),
            );
        }
        for (index, text) in self.dnsbl.iter().enumerate() {
            if let Err(why) = Blocklist::parse(text) {
                problems.at(format!("antispam.dnsbl[{index}]"), why);
            }
        }
        if !self.dnsbl.is_empty() && self.dnsbl_threshold < 1 {
            problems.at(
                "antispam.dnsbl_threshold",
                "must be at least 1, or every client would be refused",
            );
        }
    }
}

impl MilterConfig {
    fn check(&self, index: usize, problems: &mut Problems) {
        let key = |name: &str| format!("milter[{index}].{name}");
        if let Err(why) = MilterAddress::parse(&self.address) {
            problems.at(key("address"), why);
        }
        for listener in &self.on {
            if !["smtp", "submission", "smtps", "local"].contains(&listener.as_str()) {
                problems.at(
                    key("on"),
                    format!("{listener:?} is not a listener (smtp, submission, smtps, local)"),
                );
            }
        }
        for (name, value) in [
            ("connect_timeout", self.connect_timeout),
            ("command_timeout", self.command_timeout),
            ("content_timeout", self.content_timeout),
        ] {
            if value.is_zero() {
                problems.at(key(name), "must be more than 0");
            }
        }
    }
}

impl AuthConfig {
    fn check(&self, problems: &mut Problems) {
        if self.password_policy.min_strength > 4 {
            problems.at(
                "auth.password_policy.min_strength",
                "is a zxcvbn score from 0 to 4",
            );
        }
        problems.at_least_one(&[
            ("auth.max_parallel_checks", self.max_parallel_checks),
            ("auth.lockout_after", self.lockout_after as usize),
        ]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_problem_in_every_section_is_reported_with_its_key() {
        let text = "hostname = \"not a host\"\n\
                    [domains]\nlocal = [\"example.test\"]\n\
                    [aliases]\n\"postmaster@elsewhere.test\" = \"admin@example.test\"\n\
                    [tls]\ncert = \"/etc/cert.pem\"\n\
                    [delivery]\nworkers = 0\nsmarthost = \"a:b:c\"\n\
                    [dns]\ntimeout = \"0s\"\n\
                    [queue]\nretry_min = \"2h\"\nretry_max = \"1h\"\n\
                    [limits]\nmax_hops = 0\nmax_line_length = 10\n\
                    [auth]\nlockout_after = 0\n\
                    [antispam]\ndnsbl = [\"bl.example=127.0.0.[9..2]\"]\n";
        let error = Config::parse(text).unwrap_err().to_string();
        let keys = [
            "hostname",
            "aliases.\"postmaster@elsewhere.test\"",
            "tls.key",
            "delivery.workers",
            "delivery.smarthost",
            "dns.timeout",
            "queue.retry_min",
            "limits.max_hops",
            "limits.max_line_length",
            "auth.lockout_after",
            "antispam.dnsbl[0]",
        ];
        assert!(
            error.starts_with(&format!("{} problems:", keys.len())),
            "{error}"
        );
        for key in keys {
            assert!(error.contains(&format!("\n  {key}: ")), "{key}: {error}");
        }
    }

    #[test]
    fn domains_and_aliases_come_out_in_canonical_form() {
        let config = Config::parse(
            "hostname = \"mx.example.test\"\n[domains]\nlocal = [\"Example.TEST\"]\n\
             [aliases]\n\"Postmaster@example.test\" = [\"Admin@Example.test\"]\n",
        )
        .unwrap();
        assert_eq!(config.domains.local, ["example.test"]);
        let (from, targets) = config.aliases.iter().next().unwrap();
        assert_eq!(from, "postmaster@example.test");
        assert_eq!(targets.as_slice(), ["Admin@example.test"]);
    }
}
