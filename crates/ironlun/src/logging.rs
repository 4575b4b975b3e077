//! The daemon's log output on stderr: human-readable text (the default) or one JSON object per
//! line for log shippers (`serve --log-format json`, or `IRONLUN_LOG_FORMAT=json`).
//!
//! A JSON line carries `timestamp`, `level`, `target`, `fields` (the message and the event's
//! fields), `span` (the innermost span with its fields) and `spans` (every enclosing span,
//! outermost first). A connection's span `conn` has `peer` from accept and `initiator`,
//! `target` (`discovery` for a discovery session) and `tsih` from its login, so each line of a
//! session names it. Secrets (CHAP secrets, admin tokens) are never event or span fields.
//!
//! Text lines carry ANSI colours only when stderr is a terminal and `NO_COLOR` is not set
//! ([`use_ansi`]): under systemd, in a pipe or a file they are plain text.
//!
//! Every session is logged at INFO when it logs in ([`logged_in`]: initiator, target, TSIH,
//! digests as their RFC 7143 §13.1 names) and when its connection ends ([`connection_ended`]:
//! `logout` with the initiator's reason, or `connection dropped` with why: EOF, a socket
//! error, a timeout, a protocol error, the target closing it, the daemon stopping).

use ironlun_iscsi::connection::{CloseReason, SessionInfo};
use ironlun_iscsi::negotiation::{ConnectionParams, DigestKind};

/// Which formatter writes the log lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// `tracing-subscriber`'s text format.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

impl LogFormat {
    /// The flag if given, else `$IRONLUN_LOG_FORMAT` (`text` or `json`), else text. An
    /// unknown environment value is an error naming it.
    pub fn resolve(flag: Option<LogFormat>) -> Result<LogFormat, String> {
        if let Some(f) = flag {
            return Ok(f);
        }
        match std::env::var("IRONLUN_LOG_FORMAT") {
            Ok(v) => Self::parse(&v),
            Err(_) => Ok(LogFormat::Text),
        }
    }

    /// `text` or `json` (case-insensitive); empty means text.
    pub fn parse(s: &str) -> Result<LogFormat, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "" | "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(format!(
                "IRONLUN_LOG_FORMAT={other:?}: expected text or json"
            )),
        }
    }
}

/// Install the global subscriber: filter from `$IRONLUN_LOG`, else `$RUST_LOG`, else `info`.
pub fn init(format: LogFormat) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_env("IRONLUN_LOG")
        .or_else(|_| tracing_subscriber::EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = use_ansi(
        std::io::stderr().is_terminal(),
        std::env::var_os("NO_COLOR").as_deref(),
    );
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .init(),
    }
}

/// Whether text lines carry ANSI colour codes: only when stderr `is_terminal`, and not when
/// `NO_COLOR` (its value `no_color`) is set to anything but the empty string (no-color.org).
pub fn use_ansi(is_terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    is_terminal && no_color.is_none_or(|v| v.is_empty())
}

/// The tracing target of the session lines: the module that serves connections.
const LOG_TARGET: &str = "ironlun::server";

/// The login line (INFO): who logged in, to what, and the digests in force, in plain words:
/// `login initiator=iqn… target=iqn…|discovery tsih=3 header_digest=CRC32C data_digest=None`.
pub fn logged_in(info: &SessionInfo, params: Option<&ConnectionParams>) {
    let digest = |d: Option<DigestKind>| d.map_or("None", DigestKind::name);
    tracing::info!(
        target: LOG_TARGET,
        initiator = %info.initiator_name,
        target = %session_target(info),
        tsih = info.tsih,
        header_digest = %digest(params.map(|p| p.header_digest)),
        data_digest = %digest(params.map(|p| p.data_digest)),
        "login"
    );
}

/// What the `target` field of a session's lines says: its target name, or `discovery`.
pub fn session_target(info: &SessionInfo) -> &str {
    info.target_name.as_deref().unwrap_or("discovery")
}

/// Why a connection ended, as its last line says it.
#[derive(Debug)]
pub enum ConnectionEnd {
    /// The protocol layer closed it (a logout among others).
    Closed(CloseReason),
    /// The initiator closed the TCP connection (read returned 0).
    Eof,
    /// Reading the socket failed.
    ReadError(std::io::Error),
    /// Writing the socket failed, or the peer stopped reading.
    WriteError(std::io::Error),
    /// The daemon is stopping and the initiator did not log out in time.
    Shutdown,
    /// The daemon is stopping and commands did not finish within the drain time.
    DrainTimeout,
}

impl std::fmt::Display for ConnectionEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConnectionEnd::Closed(r) => write!(f, "{r}"),
            ConnectionEnd::Eof => {
                f.write_str("EOF: the initiator closed the connection without logging out")
            }
            ConnectionEnd::ReadError(e) => write!(f, "read error: {e}"),
            ConnectionEnd::WriteError(e) => write!(f, "write error: {e}"),
            ConnectionEnd::Shutdown => f.write_str("the daemon is stopping"),
            ConnectionEnd::DrainTimeout => {
                f.write_str("the daemon is stopping: commands did not finish in time")
            }
        }
    }
}

/// The line at the end of a connection: INFO `logout` or `connection dropped` for a session
/// that logged in (`session`), with `reason`; DEBUG for one that never did (failed logins
/// are counted in the metrics; scanners and health checks would flood INFO).
pub fn connection_ended(session: Option<&SessionInfo>, end: &ConnectionEnd) {
    let Some(info) = session else {
        tracing::debug!(target: LOG_TARGET, reason = %end, "connection closed before login");
        return;
    };
    let target = session_target(info);
    if matches!(end, ConnectionEnd::Closed(CloseReason::Logout(_))) {
        tracing::info!(target: LOG_TARGET, initiator = %info.initiator_name, %target, tsih = info.tsih, reason = %end, "logout");
    } else {
        tracing::info!(target: LOG_TARGET, initiator = %info.initiator_name, %target, tsih = info.tsih, reason = %end, "connection dropped");
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn colours_only_on_a_terminal_without_no_color() {
        use std::ffi::OsStr;
        assert!(use_ansi(true, None));
        assert!(use_ansi(true, Some(OsStr::new(""))));
        assert!(!use_ansi(true, Some(OsStr::new("1"))));
        assert!(!use_ansi(false, None));
        assert!(!use_ansi(false, Some(OsStr::new(""))));
    }

    #[test]
    fn connection_ends_in_words() {
        use ironlun_iscsi::pdu::LogoutReason;
        let words = |e: ConnectionEnd| e.to_string();
        assert_eq!(
            words(ConnectionEnd::Closed(CloseReason::Logout(
                LogoutReason::CloseSession
            ))),
            "logout (close the session)"
        );
        assert_eq!(
            words(ConnectionEnd::Closed(CloseReason::Timeout(
                "NOP-In unanswered"
            ))),
            "timeout: NOP-In unanswered"
        );
        assert!(words(ConnectionEnd::Eof).starts_with("EOF"));
        let e = std::io::Error::new(std::io::ErrorKind::TimedOut, "peer stopped reading");
        assert_eq!(
            words(ConnectionEnd::WriteError(e)),
            "write error: peer stopped reading"
        );
    }

    #[test]
    fn parses_format_names() {
        assert_eq!(LogFormat::parse("json"), Ok(LogFormat::Json));
        assert_eq!(LogFormat::parse(" JSON "), Ok(LogFormat::Json));
        assert_eq!(LogFormat::parse("text"), Ok(LogFormat::Text));
        assert_eq!(LogFormat::parse(""), Ok(LogFormat::Text));
        assert!(LogFormat::parse("xml").unwrap_err().contains("xml"));
        assert_eq!(
            LogFormat::resolve(Some(LogFormat::Json)),
            Ok(LogFormat::Json)
        );
    }
}
