//! Secrets named in proxy.toml: client secrets, refresh tokens, authorization
//! codes and API keys.
//!
//! A secret is written as a literal string, `{ env = "NAME" }` or
//! `{ file = "PATH" }`. [`SecretSource`] is what the file says; [`Secret`] is
//! the resolved value. Neither implements `Display`, and both print as
//! `***` under `Debug`, so a secret cannot end up in a log line by accident.
//! This module does not decide where secrets go on the wire.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::Deserialize;

/// Where a secret comes from, as written in proxy.toml.
#[derive(Clone, PartialEq, Eq)]
pub enum SecretSource {
    /// The value itself, written in the file.
    Literal(String),
    /// An environment variable of the proxy process.
    Env(String),
    /// A file whose contents (minus trailing newlines) are the value.
    File(PathBuf),
}

impl fmt::Debug for SecretSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SecretSource::Literal(_) => f.write_str("Literal(***)"),
            SecretSource::Env(name) => f.debug_tuple("Env").field(name).finish(),
            SecretSource::File(path) => f.debug_tuple("File").field(path).finish(),
        }
    }
}

impl SecretSource {
    /// Reads the value. Relative file paths are taken from `base_dir` (the
    /// folder of the config file). The error says what is missing, never the
    /// value.
    pub fn resolve(&self, base_dir: &Path) -> Result<Secret, String> {
        let value = match self {
            SecretSource::Literal(value) => value.clone(),
            SecretSource::Env(name) => std::env::var(name).map_err(|e| match e {
                std::env::VarError::NotPresent => format!("environment variable {name} is not set"),
                std::env::VarError::NotUnicode(_) => {
                    format!("environment variable {name} is not valid UTF-8")
                }
            })?,
            SecretSource::File(path) => {
                let path = base_dir.join(path);
                let text = std::fs::read_to_string(&path)
                    .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
                text.trim_end_matches(['\n', '\r']).to_owned()
            }
        };
        if value.is_empty() {
            return Err(match self {
                SecretSource::Literal(_) => "is empty".to_owned(),
                SecretSource::Env(name) => format!("environment variable {name} is empty"),
                SecretSource::File(path) => format!("file {} is empty", path.display()),
            });
        }
        Ok(Secret::new(value))
    }
}

impl<'de> Deserialize<'de> for SecretSource {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Table {
            env: Option<String>,
            file: Option<PathBuf>,
        }

        struct SourceVisitor;
        impl<'de> Visitor<'de> for SourceVisitor {
            type Value = SecretSource;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(r#"a string, { env = "NAME" } or { file = "PATH" }"#)
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<SecretSource, E> {
                Ok(SecretSource::Literal(v.to_owned()))
            }

            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<SecretSource, A::Error> {
                let table = Table::deserialize(de::value::MapAccessDeserializer::new(map))?;
                match (table.env, table.file) {
                    (Some(env), None) => Ok(SecretSource::Env(env)),
                    (None, Some(file)) => Ok(SecretSource::File(file)),
                    _ => Err(de::Error::custom(
                        r#"expected exactly one of { env = "NAME" } or { file = "PATH" }"#,
                    )),
                }
            }
        }
        deserializer.deserialize_any(SourceVisitor)
    }
}

/// A resolved secret value. Cheap to clone; compares by value; prints as `***`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Arc<str>);

impl Secret {
    /// Wraps a value.
    pub fn new(value: impl Into<Arc<str>>) -> Self {
        Secret(value.into())
    }

    /// The value, for the one place that must put it on the wire.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_the_value() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s:?}"), "Secret(***)");
        let src = SecretSource::Literal("hunter2".into());
        assert!(!format!("{src:?}").contains("hunter2"));
    }

    #[test]
    fn file_secret_drops_trailing_newline() {
        let dir = std::env::temp_dir().join(format!("fp-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("s"), "abc\r\n").unwrap();
        let s = SecretSource::File("s".into()).resolve(&dir).unwrap();
        assert_eq!(s.expose(), "abc");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn missing_env_names_the_variable() {
        let err = SecretSource::Env("FP_SURELY_NOT_SET_4711".into())
            .resolve(Path::new("."))
            .unwrap_err();
        assert!(err.contains("FP_SURELY_NOT_SET_4711"), "{err}");
    }
}
