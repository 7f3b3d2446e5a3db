//! The layering rules of the crate (issue 26), checked on the source: a
//! rule broken here is a knot someone will have to untie later.
//!
//! Every `crate::x` path outside comments counts as reaching unit `x`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

fn source_files(under: &Path) -> Vec<PathBuf> {
    if under.is_file() {
        return vec![under.to_path_buf()];
    }
    let mut files = Vec::new();
    let mut folders = vec![under.to_path_buf()];
    while let Some(folder) = folders.pop() {
        for entry in std::fs::read_dir(&folder).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                folders.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

/// The source of `unit` (a folder or a file under src/) without comments.
fn code_of(unit: &str) -> Vec<(PathBuf, String)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let path = if root.join(unit).is_dir() {
        root.join(unit)
    } else {
        root.join(format!("{unit}.rs"))
    };
    assert!(path.exists(), "no unit {unit} in src/");
    source_files(&path)
        .into_iter()
        .map(|file| {
            let text = std::fs::read_to_string(&file).unwrap();
            let code: Vec<&str> = text
                .lines()
                .filter(|line| !line.trim_start().starts_with("//"))
                .collect();
            (file, code.join("\n"))
        })
        .collect()
}

/// The top-level units `unit` reaches through `crate::` paths, with the
/// file that does.
fn reached_by(unit: &str) -> Vec<(String, PathBuf)> {
    let mut reached = Vec::new();
    for (file, code) in code_of(unit) {
        assert!(
            !code.contains("use crate::{"),
            "{}: grouped `use crate::{{...}}` hides what it reaches; one path per unit",
            file.display()
        );
        for (at, _) in code.match_indices("crate::") {
            let preceded = code[..at].chars().next_back();
            if preceded.is_some_and(|c| c.is_alphanumeric() || c == '_') {
                continue;
            }
            let name: String = code[at + "crate::".len()..]
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            reached.push((name, file.clone()));
        }
    }
    reached
}

fn assert_reaches_only(unit: &str, allowed: &[&str]) {
    let wrong: BTreeSet<String> = reached_by(unit)
        .into_iter()
        .filter(|(name, _)| !allowed.contains(&name.as_str()))
        .map(|(name, file)| format!("{} reaches {name}", file.display()))
        .collect();
    assert!(
        wrong.is_empty(),
        "{unit} may reach only {allowed:?}: {wrong:#?}"
    );
}

fn assert_never_reaches(unit: &str, forbidden: &[&str]) {
    let wrong: BTreeSet<String> = reached_by(unit)
        .into_iter()
        .filter(|(name, _)| forbidden.contains(&name.as_str()))
        .map(|(name, file)| format!("{} reaches {name}", file.display()))
        .collect();
    assert!(
        wrong.is_empty(),
        "{unit} must not reach {forbidden:?}: {wrong:#?}"
    );
}

fn assert_no_text(unit: &str, forbidden: &[&str], why: &str) {
    for (file, code) in code_of(unit) {
        for text in forbidden {
            assert!(
                !code.contains(text),
                "{}: contains {text:?}: {why}",
                file.display()
            );
        }
    }
}

#[test]
fn the_protocol_is_a_leaf() {
    assert_reaches_only("protocol", &["protocol"]);
}

#[test]
fn the_store_reaches_nothing_above_it() {
    // timefmt: the transaction's timestamp; a leaf itself (below).
    assert_reaches_only("store", &["store", "timefmt"]);
    assert_reaches_only("timefmt", &["timefmt", "protocol"]);
    assert_reaches_only("safe_fs", &["safe_fs"]);
    assert_reaches_only("printable", &["printable"]);
}

#[test]
fn delivery_never_reaches_the_inbound_side() {
    assert_never_reaches("delivery", &["server", "intake", "instance", "cli"]);
}

#[test]
fn the_server_never_reaches_delivery() {
    assert_never_reaches("server", &["delivery", "instance", "cli"]);
    assert_never_reaches("intake", &["server", "delivery", "instance", "cli"]);
}

#[test]
fn policy_and_routing_are_pure() {
    let io = [
        "store", "queue", "dns", "server", "delivery", "intake", "instance", "cli", "auth",
        "mta_sts", "tls",
    ];
    let io_text = [
        "std::fs",
        "std::net::TcpStream",
        "UdpSocket",
        "rusqlite",
        "std::thread",
    ];
    for unit in ["policy", "routing", "envelope"] {
        assert_never_reaches(unit, &io);
        assert_no_text(
            unit,
            &io_text,
            "decisions here take their facts as arguments",
        );
    }
}

#[test]
fn the_command_line_uses_the_modules_serve_uses() {
    // Its data through queue/, auth/ and store/, never SQL of its own;
    // the running server only through server::control (and sendmail's
    // submission socket, the same one local programs use).
    assert_no_text(
        "cli",
        &[
            "SELECT ",
            "INSERT ",
            "UPDATE ",
            "DELETE FROM",
            "CONTROL_SOCKET)",
        ],
        "the command line goes through the modules the server uses",
    );
    for (file, code) in code_of("cli") {
        if !file.ends_with("sendmail.rs") {
            assert!(
                !code.contains("UnixStream::connect"),
                "{}: talks to the server past server::control",
                file.display()
            );
        }
    }
}

/// The rules above are real: a checker that sees nothing proves nothing.
#[test]
fn the_checker_sees_paths() {
    let protocol = reached_by("protocol");
    assert!(protocol.iter().any(|(name, _)| name == "protocol"));
    let server = reached_by("server");
    for unit in ["protocol", "intake", "store", "config"] {
        assert!(
            server.iter().any(|(name, _)| name == unit),
            "server reaches {unit}"
        );
    }
}
