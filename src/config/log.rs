//! `[log]`: the level filter, the line format and the access log switch.

use serde::Deserialize;

use super::{ConfigError, Ctx};

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// `[log]`.
#[derive(Debug, Clone)]
pub struct LogConfig {
    /// A `tracing` filter directive (`RUST_LOG` overrides it).
    pub level: String,
    /// Text or JSON lines.
    pub format: LogFormat,
    /// One line per request (`[log] access`).
    pub access: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLog {
    #[serde(default = "default_level")]
    level: String,
    #[serde(default)]
    format: LogFormat,
    #[serde(default = "d_access_log")]
    access: bool,
}

impl Default for RawLog {
    fn default() -> Self {
        RawLog {
            level: default_level(),
            format: LogFormat::Text,
            access: true,
        }
    }
}

/// The access log is on unless turned off: it is what an operator reads
/// first, and what Flinks support asks for (`ob-correlation-id`).
fn d_access_log() -> bool {
    true
}

fn default_level() -> String {
    "info".to_owned()
}

impl Ctx {
    /// `[log]`: the level must be a filter `tracing` accepts.
    pub(super) fn log(&self, raw: RawLog) -> Result<LogConfig, ConfigError> {
        tracing_subscriber::EnvFilter::try_new(&raw.level)
            .map_err(|e| self.err("log.level", format!("not a valid level or filter: {e}")))?;
        Ok(LogConfig {
            level: raw.level,
            format: raw.format,
            access: raw.access,
        })
    }
}

#[cfg(test)]
mod tests {
    use crate::config::tests::{parse, GOOD};

    #[test]
    fn access_log_is_on_by_default_and_can_be_turned_off() {
        assert!(parse(GOOD).unwrap().log.access);
        let off = parse(&format!("[log]\naccess = false\n{GOOD}")).unwrap();
        assert!(!off.log.access);
        let e = parse(&format!("[log]\naccess = \"no\"\n{GOOD}")).unwrap_err();
        assert!(e.to_string().contains("log.access"), "{e}");
    }
}
