//! `petrel dns-check` against a DNS server on loopback: a domain with
//! every record in place, and one with none (what to publish is printed,
//! with this server's name, address and DKIM key filled in). The server's
//! address is documentation space (192.0.2.0/24): only a record value, never
//! connected to; a loopback one would get the resolver's built-in "localhost".

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;

use common::dns::TestDns;
use common::https::{HttpsServer, TestCa};
use common::serving::{dkim_generate, petrel};

/// The policy server is on loopback, with a certificate of the test CA.
fn config(dir: &Path, dns: &TestDns, https: &HttpsServer, ca: &TestCa) -> PathBuf {
    let path = dir.join("petrel.toml");
    let text = format!(
        "hostname = \"mail.example.test\"\ndata_dir = \"{}\"\n\
         [domains]\nlocal = [\"example.test\"]\n\
         [dns]\nnameservers = [\"{}\"]\n\
         [dkim]\nselector = \"s1\"\n\
         [delivery]\nallowed_networks = [\"127.0.0.0/8\"]\nmta_sts_port = {}\nca_file = \"{}\"\n",
        dir.join("data").display(),
        dns.addr,
        https.port,
        ca.ca_path().display()
    );
    std::fs::write(&path, text).unwrap();
    path
}

/// `petrel dns-check DOMAIN --address 192.0.2.25 [--strict]`: its exit
/// status and the table it printed.
fn dns_check(config: &Path, domain: &str, strict: bool) -> (Output, String) {
    let output = petrel()
        .args(["-c", config.to_str().unwrap()])
        .args(["dns-check", domain, "--address", "192.0.2.25"])
        .args(strict.then_some("--strict"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    (output, stdout)
}

#[test]
fn a_fully_configured_domain_passes_and_an_empty_one_gets_its_records() {
    let dir = tempfile::tempdir().unwrap();
    let dns = TestDns::start();
    let ca = TestCa::new();
    let (cert, key) = ca.leaf("mta-sts.example.test");
    let https = HttpsServer::start(&cert, &key);
    https.serve_policy(
        "version: STSv1\r\nmode: enforce\r\nmx: mail.example.test\r\nmax_age: 604800\r\n",
    );
    let config = config(dir.path(), &dns, &https, &ca);
    let (name, strings) = dkim_generate(&config, &["example.test"]);
    dns.mx("example.test", 10, "mail.example.test")
        .a("mail.example.test", "192.0.2.25")
        .ptr("192.0.2.25", "mail.example.test")
        .txt("example.test", &["v=spf1 mx -all".into()])
        .txt(&name, &strings)
        .txt(
            "_dmarc.example.test",
            &["v=DMARC1; p=reject; rua=mailto:postmaster@example.test".into()],
        )
        .txt("_mta-sts.example.test", &["v=STSv1; id=20261129".into()])
        .a("mta-sts.example.test", "127.0.0.1")
        .txt(
            "_smtp._tls.example.test",
            &["v=TLSRPTv1; rua=mailto:tls@example.test".into()],
        );

    let (output, table) = dns_check(&config, "example.test", true);
    assert_eq!(output.status.code(), Some(0), "{table}");
    for check in [
        "MX", "A/AAAA", "PTR", "SPF", "DKIM", "DMARC", "MTA-STS", "TLS-RPT",
    ] {
        let row = table
            .lines()
            .find(|l| l.starts_with(&format!("{check} ")))
            .unwrap_or_else(|| panic!("no {check} row: {table}"));
        assert!(row.contains(" ok "), "{row}\n{table}");
    }
    assert!(table.contains("Everything is in place."), "{table}");
    assert!(
        table.contains("policy: mode enforce, mx mail.example.test"),
        "{table}"
    );
    assert_eq!(https.requests(), 1);
    // A policy that does not list this server is wrong.
    https.serve_policy(
        "version: STSv1\r\nmode: enforce\r\nmx: mx.elsewhere.example\r\nmax_age: 604800\r\n",
    );
    let (output, table) = dns_check(&config, "example.test", true);
    assert_eq!(output.status.code(), Some(1), "{table}");
    assert!(
        table.contains("does not list mail.example.test as an MX"),
        "{table}"
    );

    // The same server, a domain with nothing published.
    let (output, table) = dns_check(&config, "empty.test", false);
    assert_eq!(output.status.code(), Some(1), "{table}");
    for expected in [
        "empty.test. IN MX 10 mail.example.test.",
        "empty.test. IN TXT \"v=spf1 mx -all\"",
        "_dmarc.empty.test. IN TXT \"v=DMARC1; p=none; rua=mailto:postmaster@empty.test\"",
        "no key here yet: run `petrel dkim generate empty.test`",
        "_smtp._tls.empty.test. IN TXT \"v=TLSRPTv1; rua=mailto:postmaster@empty.test\"",
        // One path, starting safe: reports first, then tighten.
        "mode: testing",
        "switch to mode: enforce",
        "then p=reject",
    ] {
        assert!(table.contains(expected), "{expected:?} in\n{table}");
    }
    // The host's own records are right, whatever the domain.
    let row = |check: &str| {
        table
            .lines()
            .find(|l| l.starts_with(&format!("{check} ")))
            .unwrap_or_default()
            .to_string()
    };
    assert!(row("PTR").contains(" ok "), "{table}");
    assert!(row("MX").contains("MISSING"), "{table}");

    // Recommended records change the exit code only with --strict.
    let example_without_sts = TestDns::start();
    let config2 = config_without_sts(
        dir.path(),
        &example_without_sts,
        &https,
        &ca,
        &name,
        &strings,
    );
    let (output, table) = dns_check(&config2, "example.test", false);
    assert_eq!(output.status.code(), Some(0), "{table}");
    assert!(table.contains("MTA-STS  recommended  MISSING"), "{table}");
    let (output, _) = dns_check(&config2, "example.test", true);
    assert_eq!(output.status.code(), Some(1));
}

/// The configured domain's records, but no MTA-STS or TLS-RPT.
fn config_without_sts(
    dir: &Path,
    dns: &TestDns,
    https: &HttpsServer,
    ca: &TestCa,
    dkim_name: &str,
    dkim: &[String],
) -> PathBuf {
    dns.mx("example.test", 10, "mail.example.test")
        .a("mail.example.test", "192.0.2.25")
        .ptr("192.0.2.25", "mail.example.test")
        .txt("example.test", &["v=spf1 mx -all".into()])
        .txt(dkim_name, dkim)
        .txt("_dmarc.example.test", &["v=DMARC1; p=none".into()]);
    let sub = dir.join("second");
    std::fs::create_dir_all(&sub).unwrap();
    let path = config(&sub, dns, https, ca);
    // The same key: the second config reads the first one's key_dir.
    let text = std::fs::read_to_string(&path).unwrap().replace(
        "[dkim]\n",
        &format!(
            "[dkim]\nkey_dir = \"{}\"\n",
            dir.join("data/dkim").display()
        ),
    );
    std::fs::write(&path, text).unwrap();
    path
}
