//! systemd integration: `conf/ironlun.service` passes `systemd-analyze verify`, and the daemon
//! speaks the sd_notify protocol (READY=1 after binding, WATCHDOG=1 every WATCHDOG_USEC/2,
//! RELOADING=1 and READY=1 around a SIGHUP reload, STOPPING=1 on SIGTERM) to a datagram socket standing in for systemd.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use ironlun_testkit::{Daemon, PROMPT};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::process::Command;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_ironlun");

/// `systemd-analyze verify` needs the ExecStart binaries and the `man:` documentation to
/// exist: it runs on a copy of the unit whose `/usr/local/bin/ironlun` is the binary under
/// test, with MANPATH pointing at pages that binary generated (`ironlun man --out-dir`).
#[test]
fn unit_passes_systemd_analyze_verify() {
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../conf/ironlun.service"
    ))
    .unwrap();
    for key in [
        "Type=notify",
        "NotifyAccess=main",
        "WatchdogSec=",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "\nCapabilityBoundingSet=\n",
        "#CapabilityBoundingSet=CAP_NET_BIND_SERVICE",
        "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX",
        "MemoryDenyWriteExecute=yes",
        "SystemCallArchitectures=native",
    ] {
        assert!(unit.contains(key), "the unit lacks {key:?}");
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ironlun.service");
    std::fs::write(&path, unit.replace("/usr/local/bin/ironlun", BIN)).unwrap();
    let man1 = dir.path().join("man").join("man1");
    let o = Command::new(BIN)
        .args(["man", "--out-dir"])
        .arg(&man1)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .env("MANPATH", dir.path().join("man"))
        .output()
        .expect("systemd-analyze (package systemd; scripts/install-deps.sh installs it)");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "systemd-analyze verify: {err}");
    assert!(
        !err.contains("ironlun.service"),
        "warnings about the unit: {err}"
    );
}

/// The daemon with `NOTIFY_SOCKET` (and `extra` variables), once its `admin` line is printed.
fn spawn(notify: &str, extra: &[(&str, &str)], data: &std::path::Path) -> Daemon {
    let b = Daemon::builder(BIN)
        .env("NOTIFY_SOCKET", notify)
        .env_remove("WATCHDOG_USEC")
        .env_remove("WATCHDOG_PID");
    extra.iter().fold(b, |b, (k, v)| b.env(k, v)).start_in(data)
}

fn recv(sock: &UnixDatagram, within: Duration) -> Option<String> {
    sock.set_read_timeout(Some(within.max(Duration::from_millis(1))))
        .unwrap();
    let mut buf = [0u8; 4096];
    match sock.recv(&mut buf) {
        Ok(n) => Some(String::from_utf8_lossy(&buf[..n]).into_owned()),
        Err(_) => None,
    }
}

/// Datagrams until one containing `want` (within `within`); panics if none does.
fn until(sock: &UnixDatagram, want: &str, within: Duration) -> Vec<String> {
    let deadline = Instant::now() + within;
    let mut got = Vec::new();
    while let Some(m) = recv(sock, deadline.saturating_duration_since(Instant::now())) {
        let done = m.lines().any(|l| l == want);
        got.push(m);
        if done {
            return got;
        }
    }
    panic!("no {want} within {within:?}; got {got:?}");
}

#[test]
fn ready_watchdog_and_stopping_on_a_path_socket() {
    let dir = tempfile::tempdir().unwrap();
    let sock_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    let mut child = spawn(
        sock_path.to_str().unwrap(),
        &[("WATCHDOG_USEC", "200000")],
        dir.path(),
    );
    // READY=1 is the first notification, sent after the listening/admin lines.
    let first = recv(&sock, Duration::from_secs(10)).expect("no READY=1");
    let lines: Vec<&str> = first.lines().collect();
    assert_eq!(lines[0], "READY=1", "{first:?}");
    assert!(
        lines.iter().any(|l| l.starts_with("STATUS=serving ")),
        "{first:?}"
    );
    // WATCHDOG_USEC 200 ms: pings every 100 ms. Three arrive, one after another, with nothing
    // else between them (the wait is a hang guard, not a bound on the interval).
    for i in 0..3 {
        let m = recv(&sock, PROMPT).unwrap_or_else(|| panic!("watchdog ping {i} never came"));
        assert_eq!(m, "WATCHDOG=1");
    }
    // SIGHUP (ExecReload): RELOADING=1, then READY=1 when the reload is over. This daemon
    // runs on the embedded default, so the reload has no file and reports that it failed.
    child.signal("HUP");
    let got = until(&sock, "RELOADING=1", Duration::from_secs(10));
    assert!(got.last().unwrap().starts_with("RELOADING=1\n"), "{got:?}");
    let got = until(&sock, "READY=1", Duration::from_secs(10));
    let ready = got.last().unwrap();
    assert!(
        ready.starts_with("READY=1\nSTATUS=serving; configuration reload failed"),
        "{got:?}"
    );
    child.sigterm();
    let got = until(&sock, "STOPPING=1", Duration::from_secs(10));
    assert!(
        got[..got.len() - 1].iter().all(|m| m == "WATCHDOG=1"),
        "{got:?}"
    );
    let status = child.wait_exit(PROMPT);
    assert!(status.success(), "{status:?}");
}

/// An abstract socket (`@name`), and a watchdog meant for another process (WATCHDOG_PID not
/// ours): READY=1 and STOPPING=1, no pings.
#[test]
fn abstract_socket_and_foreign_watchdog_pid() {
    let dir = tempfile::tempdir().unwrap();
    let name = format!("ironlun-test-{}-{:?}", std::process::id(), Instant::now());
    let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
    let sock = UnixDatagram::bind_addr(&addr).unwrap();
    let mut child = spawn(
        &format!("@{name}"),
        &[("WATCHDOG_USEC", "100000"), ("WATCHDOG_PID", "1")],
        dir.path(),
    );
    let first = recv(&sock, Duration::from_secs(10)).expect("no READY=1");
    assert!(first.starts_with("READY=1\n"), "{first:?}");
    assert_eq!(
        recv(&sock, Duration::from_millis(400)),
        None,
        "pinged anyway"
    );
    child.sigterm();
    let got = until(&sock, "STOPPING=1", Duration::from_secs(10));
    assert_eq!(got.len(), 1, "{got:?}");
    assert!(child.wait_exit(PROMPT).success());
}
