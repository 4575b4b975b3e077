//! systemd readiness and watchdog notifications (sd_notify(3) protocol, without libsystemd).
//!
//! With `Type=notify` systemd passes `$NOTIFY_SOCKET`: a Unix datagram socket, a path
//! (`/run/systemd/notify`) or an abstract name written `@name`. Each notification is one
//! datagram of newline-separated `KEY=VALUE` assignments. The daemon sends `READY=1` once its
//! portals and the admin API are bound, `WATCHDOG=1` every `$WATCHDOG_USEC / 2` while its
//! runtime schedules tasks, `RELOADING=1` / `READY=1` around a configuration reload and
//! `STOPPING=1` when it begins to shut down.
//!
//! Without `$NOTIFY_SOCKET` every function is a no-op; a send that fails is logged at debug
//! and otherwise ignored (the service manager, not the daemon, decides what a missed
//! notification means).

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::OnceLock;
use std::time::Duration;

/// Where notifications go, resolved once from `$NOTIFY_SOCKET`.
struct Notifier {
    sock: UnixDatagram,
    addr: SocketAddr,
}

fn notifier() -> Option<&'static Notifier> {
    static N: OnceLock<Option<Notifier>> = OnceLock::new();
    N.get_or_init(|| {
        let spec = std::env::var_os("NOTIFY_SOCKET")?;
        let addr = match parse_socket(spec.to_str()?) {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "NOTIFY_SOCKET ignored");
                return None;
            }
        };
        match UnixDatagram::unbound() {
            Ok(sock) => Some(Notifier { sock, addr }),
            Err(e) => {
                tracing::warn!(error = %e, "cannot open a socket for NOTIFY_SOCKET");
                None
            }
        }
    })
    .as_ref()
}

/// `$NOTIFY_SOCKET` as an address: an absolute path, or `@name` for the abstract namespace.
/// Other forms (relative paths, `vsock:`) are refused.
pub fn parse_socket(spec: &str) -> std::io::Result<SocketAddr> {
    if let Some(name) = spec.strip_prefix('@') {
        SocketAddr::from_abstract_name(name.as_bytes())
    } else if spec.starts_with('/') {
        SocketAddr::from_pathname(spec)
    } else {
        Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{spec:?}: expected an absolute path or @abstract-name"),
        ))
    }
}

/// Send `state` (newline-separated assignments). `false` when there is no notify socket or the
/// send failed.
pub fn notify(state: &str) -> bool {
    let Some(n) = notifier() else {
        return false;
    };
    match n.sock.send_to_addr(state.as_bytes(), &n.addr) {
        Ok(_) => true,
        Err(e) => {
            tracing::debug!(error = %e, "sd_notify send failed");
            false
        }
    }
}

/// `READY=1` with a one-line `STATUS=` for `systemctl status`; also ends a reload.
pub fn ready(status: &str) -> bool {
    notify(&format!("READY=1\nSTATUS={}", one_line(status)))
}

/// `RELOADING=1`: a configuration reload began; [`ready`] ends it.
pub fn reloading() -> bool {
    notify("RELOADING=1\nSTATUS=reloading configuration")
}

/// `STOPPING=1`: shutdown began (connections drain, backstores flush).
pub fn stopping() -> bool {
    notify("STOPPING=1\nSTATUS=shutting down")
}

/// The watchdog ping period from the environment: half of `$WATCHDOG_USEC`, when the watchdog
/// is ours (`$WATCHDOG_PID` unset or our pid) and there is a notify socket.
pub fn watchdog_interval() -> Option<Duration> {
    std::env::var_os("NOTIFY_SOCKET")?;
    let usec = std::env::var("WATCHDOG_USEC").ok();
    let pid = std::env::var("WATCHDOG_PID").ok();
    ping_interval(usec.as_deref(), pid.as_deref(), std::process::id())
}

/// Half of `usec` (sd_watchdog_enabled(3): ping at least that often), or `None` when `usec`
/// is absent, not a positive number, or `pid` names another process.
pub fn ping_interval(usec: Option<&str>, pid: Option<&str>, ours: u32) -> Option<Duration> {
    if let Some(p) = pid {
        if p.trim().parse::<u32>().ok()? != ours {
            return None;
        }
    }
    let usec = usec?.trim().parse::<u64>().ok().filter(|u| *u > 0)?;
    Some(Duration::from_micros(usec / 2).max(Duration::from_millis(1)))
}

/// Ping `WATCHDOG=1` every `every` until `shutdown` turns true. It runs as a task on the
/// daemon's runtime, so a ping proves the scheduler still runs tasks: a runtime wedged by a
/// blocked worker stops the pings and systemd restarts the service.
pub async fn watchdog(every: Duration, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                notify("WATCHDOG=1");
            }
            r = shutdown.changed() => {
                if r.is_err() || *shutdown.borrow() {
                    return;
                }
            }
        }
    }
}

/// `s` with line breaks replaced: a newline would start a new assignment.
fn one_line(s: &str) -> String {
    s.replace(['\n', '\r'], " ")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn watchdog_interval_is_half_and_only_ours() {
        assert_eq!(
            ping_interval(Some("200000"), None, 7),
            Some(Duration::from_millis(100))
        );
        assert_eq!(
            ping_interval(Some("200000"), Some("7"), 7),
            Some(Duration::from_millis(100))
        );
        assert_eq!(ping_interval(Some("200000"), Some("8"), 7), None);
        assert_eq!(ping_interval(Some("200000"), Some("x"), 7), None);
        assert_eq!(ping_interval(None, None, 7), None);
        assert_eq!(ping_interval(Some("0"), None, 7), None);
        assert_eq!(ping_interval(Some("-5"), None, 7), None);
        assert_eq!(
            ping_interval(Some("1"), None, 7),
            Some(Duration::from_millis(1))
        );
    }

    #[test]
    fn socket_addresses() {
        let a = parse_socket("/run/systemd/notify").unwrap();
        assert_eq!(
            a.as_pathname(),
            Some(std::path::Path::new("/run/systemd/notify"))
        );
        let a = parse_socket("@ironlun-test").unwrap();
        assert_eq!(a.as_abstract_name(), Some(&b"ironlun-test"[..]));
        assert!(parse_socket("relative/path").is_err());
        assert!(parse_socket("vsock:2:1234").is_err());
    }

    #[test]
    fn status_stays_one_assignment() {
        assert_eq!(one_line("a\nb\rc"), "a b c");
    }
}
