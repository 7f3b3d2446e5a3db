//! `petrel check-config`, in the spirit of `nginx -t`: beyond parsing the
//! file (which `Config::parse` does), it tries what the server would do
//! with it — loads the certificate and key and checks they match, reads
//! every file the config names, looks at the data dir — and warns about
//! mistakes that are valid TOML but dangerous (an open relay) or lose mail
//! (a postmaster that goes nowhere). It never writes anything.

use std::path::Path;

use super::{Failure, say};
use crate::config::{Config, ConfigSource};

/// What is wrong, in two grades: errors stop `serve`, warnings do not.
#[derive(Debug, Default)]
pub struct Findings {
    pub errors: Vec<String>,
    pub warnings: Vec<String>,
    /// What was tried and worked (a milter that answered).
    pub confirmed: Vec<String>,
}

pub fn run(config: &Config, source: &ConfigSource) -> Result<(), Failure> {
    let findings = check(config);
    for error in &findings.errors {
        eprintln!("petrel: error: {error}");
    }
    for warning in &findings.warnings {
        eprintln!("petrel: warning: {warning}");
    }
    if !findings.errors.is_empty() {
        return Err(Failure::Usage(format!(
            "configuration {source} has {} error(s); petrel serve would not start",
            findings.errors.len()
        )));
    }
    say!("# petrel: configuration OK ({source})");
    for confirmed in &findings.confirmed {
        say!("# {confirmed}");
    }
    for warning in &findings.warnings {
        say!("# warning: {warning}");
    }
    say!("# effective settings:");
    say!("{}", config.to_toml().trim_end());
    Ok(())
}

pub fn check(config: &Config) -> Findings {
    let mut findings = Findings::default();
    check_tls(config, &mut findings);
    check_files(config, &mut findings);
    check_data_dir(&config.data_dir, &mut findings);
    check_relay(config, &mut findings);
    check_run_as(config, &mut findings);
    check_milters(config, &mut findings);
    if !read_data_dir_as_server(config, &mut findings) {
        return findings;
    }
    check_dkim(config, &mut findings);
    let existing = existing_accounts(config);
    findings
        .warnings
        .extend(crate::intake::directory::deliverability_warnings(
            config,
            |a| existing.contains(a),
        ));
    findings
}

/// Each milter is asked its options, as the server would at the end of
/// DATA: one that does not answer is a warning (it may not be started
/// yet), saying what its `on_failure` will do with mail meanwhile.
fn check_milters(config: &Config, findings: &mut Findings) {
    for milter in &config.milter {
        match crate::intake::milter::probe(milter) {
            Ok(()) => findings
                .confirmed
                .push(format!("milter {} answers", milter.address)),
            Err(why) => findings.warnings.push(format!(
                "milter {}: {why}; until it answers, mail for it is handled as on_failure = {} \
                 says",
                milter.address,
                match milter.on_failure {
                    crate::config::OnFailure::Tempfail => "\"tempfail\" (deferred)",
                    crate::config::OnFailure::Accept => "\"accept\" (unfiltered)",
                    crate::config::OnFailure::Reject => "\"reject\" (refused)",
                }
            )),
        }
    }
}

/// The rest reads inside data_dir, which the server's user may change:
/// root reads it as that user (this command ends soon after), or not at
/// all when nobody is configured and the folders on the way are not
/// root's alone. Returns whether data_dir may be read.
fn read_data_dir_as_server(config: &Config, findings: &mut Findings) -> bool {
    use crate::server::privileges::{self, RunAs};
    if !rustix::process::geteuid().is_root() {
        // Another user cannot read the keys and accounts: not checked,
        // rather than reported missing.
        if let Err(user) = privileges::may_act_as_server(&config.server, &config.data_dir) {
            findings.warnings.push(format!(
                "DKIM keys and accounts in {} not checked: they are readable by root and {user} \
                 only (run check-config as one of them)",
                config.data_dir.display()
            ));
            return false;
        }
        return true;
    }
    match RunAs::from_config(&config.server) {
        Ok(Some(run_as)) => match privileges::switch(&run_as) {
            Ok(()) => true,
            Err(error) => {
                findings.errors.push(error.to_string());
                false
            }
        },
        Ok(None) => match privileges::root_may_work_in(&config.data_dir) {
            Ok(()) => true,
            Err(error) => {
                findings.errors.push(error.to_string());
                false
            }
        },
        // Already reported by check_run_as.
        Err(_) => false,
    }
}

/// The keys `serve` would load; local domains it would not sign for.
fn check_dkim(config: &Config, findings: &mut Findings) {
    match crate::dkim::Signer::load(config) {
        Err(error) => findings.errors.push(error.to_string()),
        Ok(signer) => {
            let signed = signer.domains();
            for domain in &config.domains.local {
                if !signed.contains(&domain.to_ascii_lowercase()) {
                    findings.warnings.push(format!(
                        "dkim: mail from {domain} leaves unsigned (many providers file it as \
                         spam): `petrel dkim generate {domain}` makes a key"
                    ));
                }
            }
        }
    }
}

fn check_tls(config: &Config, findings: &mut Findings) {
    let (Some(cert), Some(key)) = (&config.tls.cert, &config.tls.key) else {
        findings.warnings.push(format!(
            "no [tls] cert/key: a self-signed certificate is generated in {}/tls/ \
             (clients will not trust it)",
            config.data_dir.display()
        ));
        return;
    };
    match crate::tls::check_pair(cert, key) {
        Ok(end_entity) => {
            if let Err(why) = crate::tls::covers_name(&end_entity, &config.hostname) {
                findings.warnings.push(format!(
                    "certificate {} is not valid for hostname {:?} ({why}); clients checking \
                     the name will refuse it",
                    cert.display(),
                    config.hostname
                ));
            }
        }
        Err(error) => findings.errors.push(error.to_string()),
    }
}

fn check_files(config: &Config, findings: &mut Findings) {
    let delivery = &config.delivery;
    if let Some(ca) = &delivery.smarthost_ca
        && let Err(error) = crate::tls::load_certificates(ca)
    {
        findings
            .errors
            .push(format!("delivery.smarthost_ca: {error}"));
    }
    if let Some(ca) = &delivery.ca_file
        && let Err(error) = crate::tls::load_certificates(ca)
    {
        findings.errors.push(format!("delivery.ca_file: {error}"));
    }
    if let Some(file) = &delivery.smarthost_password_file
        && let Err(error) = std::fs::read_to_string(file)
    {
        findings.errors.push(format!(
            "delivery.smarthost_password_file: cannot read {}: {error}",
            file.display()
        ));
    }
    let privileged = [&config.smtp, &config.submission, &config.smtps]
        .into_iter()
        .flat_map(|l| &l.listen)
        .filter(|a| a.port() < 1024)
        .count();
    if privileged > 0 && !rustix::process::geteuid().is_root() {
        findings.warnings.push(
            "listening on ports below 1024 needs root (then [server] user to drop \
             privileges) or CAP_NET_BIND_SERVICE"
                .to_string(),
        );
    }
}

fn check_data_dir(data_dir: &Path, findings: &mut Findings) {
    use std::os::unix::fs::MetadataExt as _;
    match std::fs::metadata(data_dir) {
        Ok(meta) if !meta.is_dir() => findings.errors.push(format!(
            "data_dir {} exists but is not a directory",
            data_dir.display()
        )),
        Ok(meta) => {
            if rustix::fs::access(
                data_dir,
                rustix::fs::Access::WRITE_OK | rustix::fs::Access::EXEC_OK,
            )
            .is_err()
            {
                findings.errors.push(format!(
                    "data_dir {} is not writable by this user",
                    data_dir.display()
                ));
            }
            let mode = meta.mode() & 0o777;
            // 0711: others may pass through to public/submit.sock (local
            // sendmail) but neither list nor read anything.
            if mode & 0o066 != 0 {
                findings.warnings.push(format!(
                    "data_dir {} is mode {mode:o}; petrel serve makes it 0711 (it holds queued \
                     mail and password hashes)",
                    data_dir.display()
                ));
            }
            let me = rustix::process::geteuid().as_raw();
            if meta.uid() != me && me != 0 {
                findings.warnings.push(format!(
                    "data_dir {} belongs to uid {}, not to this user (uid {me})",
                    data_dir.display(),
                    meta.uid()
                ));
            }
        }
        Err(_) => {
            // It will be created: the nearest existing parent must allow it.
            let parent = data_dir
                .ancestors()
                .skip(1)
                .find(|p| p.as_os_str().is_empty() || p.exists())
                .map(|p| {
                    if p.as_os_str().is_empty() {
                        Path::new(".")
                    } else {
                        p
                    }
                });
            if let Some(parent) = parent
                && rustix::fs::access(parent, rustix::fs::Access::WRITE_OK).is_err()
            {
                findings.errors.push(format!(
                    "data_dir {} does not exist and cannot be created in {}",
                    data_dir.display(),
                    parent.display()
                ));
            }
        }
    }
}

/// `[server] user`: it must exist, and read what the server reads again
/// after becoming it.
fn check_run_as(config: &Config, findings: &mut Findings) {
    use crate::server::privileges::RunAs;
    let run_as = match RunAs::from_config(&config.server) {
        Ok(Some(run_as)) => run_as,
        Ok(None) => return,
        Err(error) => {
            findings.errors.push(error.to_string());
            return;
        }
    };
    for (key, path) in [("tls.cert", &config.tls.cert), ("tls.key", &config.tls.key)] {
        if let Some(path) = path
            && path.exists()
            && !run_as.can_read(path)
        {
            findings.warnings.push(format!(
                "{key} {} is read at start as root, but {} cannot read it, so a renewed \
                 certificate will not be picked up without a restart (give group {} read \
                 access, or copy the files in a certbot deploy hook)",
                path.display(),
                run_as.user,
                run_as.group
            ));
        }
    }
    if let Some(path) = &config.delivery.smarthost_password_file
        && !run_as.can_read(path)
    {
        findings.errors.push(format!(
            "delivery.smarthost_password_file {} is read at each delivery, as {}, who \
             cannot read it (chgrp {} it and chmod 0640)",
            path.display(),
            run_as.user,
            run_as.group
        ));
    }
}

/// Networks so wide that trusting them makes an open relay: any IPv4
/// prefix shorter than /8 and any IPv6 prefix shorter than /32.
fn check_relay(config: &Config, findings: &mut Findings) {
    for network in &config.relay.trusted_networks {
        let too_wide = match network {
            ipnet::IpNet::V4(v4) => v4.prefix_len() < 8,
            ipnet::IpNet::V6(v6) => v6.prefix_len() < 32,
        };
        if too_wide {
            findings.warnings.push(format!(
                "relay.trusted_networks contains {network}: everyone in it may relay mail \
                 anywhere without logging in (an open relay)"
            ));
        }
    }
}

/// Accounts in an existing queue database, read without creating or
/// migrating anything: check-config must not write.
fn existing_accounts(config: &Config) -> std::collections::HashSet<String> {
    use rusqlite::OpenFlags;
    let path = config.data_dir.join(crate::store::data_dir::QUEUE_FILE);
    let Ok(conn) = rusqlite::Connection::open_with_flags(&path, OpenFlags::SQLITE_OPEN_READ_ONLY)
    else {
        return Default::default();
    };
    crate::auth::accounts::addresses(&conn).unwrap_or_default()
}
