//! The daemon's log output on stderr: human-readable text (the default) or one JSON object per
//! line for log shippers (`serve --log-format json`, or `IRONLUN_LOG_FORMAT=json`).
//!
//! A JSON line carries `timestamp`, `level`, `target`, `fields` (the message and the event's
//! fields), `span` (the innermost span with its fields) and `spans` (every enclosing span,
//! outermost first). A connection's span `conn` has `peer` from accept and `initiator`,
//! `target` and `tsih` from its login, so each line of a session names it. Secrets (CHAP
//! secrets, admin tokens) are never event or span fields.

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
    let filter = tracing_subscriber::EnvFilter::try_from_env("IRONLUN_LOG")
        .or_else(|_| tracing_subscriber::EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

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
