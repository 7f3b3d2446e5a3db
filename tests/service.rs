//! Running as a service: systemd readiness notification from the real
//! binary, and the shipped unit checked by `systemd-analyze verify`.

mod common;

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::time::Duration;

use common::serving::{Serving, petrel, write_config};

fn receive(socket: &UnixDatagram) -> String {
    socket
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut buf = [0u8; 512];
    let n = socket.recv(&mut buf).expect("a notification");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[test]
fn serve_tells_systemd_when_it_is_ready_and_when_it_stops() {
    let dns = common::standard_dns();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        &format!("[dns]\nnameservers = [\"{}\"]\n", dns.addr),
    );
    for target in [
        dir.path().join("notify.sock").display().to_string(),
        format!("@petrel-test-{}", std::process::id()),
    ] {
        let socket = match target.strip_prefix('@') {
            Some(name) => {
                use std::os::linux::net::SocketAddrExt as _;
                let address = std::os::unix::net::SocketAddr::from_abstract_name(name).unwrap();
                UnixDatagram::bind_addr(&address).unwrap()
            }
            None => UnixDatagram::bind(&target).unwrap(),
        };
        let mut command = petrel();
        command
            .arg("serve")
            .arg("-c")
            .arg(&config)
            .env("NOTIFY_SOCKET", &target);
        let serving = Serving::spawn(command);
        let ready = receive(&socket);
        assert!(ready.starts_with("READY=1"), "{target}: {ready:?}");
        let (code, _) = serving.terminate();
        assert_eq!(code, 0);
        assert_eq!(receive(&socket), "STOPPING=1", "{target}");
    }
}

#[test]
fn the_systemd_unit_passes_systemd_analyze_verify() {
    let unit = Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/systemd/petrel.service");
    let text = std::fs::read_to_string(&unit).unwrap();
    // What the unit promises the README and the package.
    for line in [
        "Type=notify",
        "ExecStart=/usr/sbin/petrel serve -c /etc/petrel/petrel.toml",
        "User=petrel",
        "AmbientCapabilities=CAP_NET_BIND_SERVICE",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ReadWritePaths=/var/lib/petrel",
        "PrivateTmp=yes",
    ] {
        assert!(text.lines().any(|l| l == line), "unit lacks {line}");
    }
    let Ok(version) = std::process::Command::new("systemd-analyze")
        .arg("--version")
        .output()
    else {
        eprintln!("SKIPPED systemd-analyze verify: systemd-analyze is not installed");
        return;
    };
    assert!(version.status.success());
    // verify checks that ExecStart exists: point it at the built binary.
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("petrel.service");
    std::fs::write(
        &copy,
        text.replace("/usr/sbin/petrel", env!("CARGO_BIN_EXE_petrel")),
    )
    .unwrap();
    let output = std::process::Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&copy)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&output.stderr).into_owned()
        + &String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{said}");
    assert!(said.trim().is_empty(), "systemd-analyze warned: {said}");
}
