//! The state file of a `refresh_token` / `authorization_code` credential:
//! the refresh token, the `sub` claim and when it was obtained and last used.
//!
//! Written atomically (temporary file in the same folder, fsync, rename,
//! fsync of the folder) with mode 0600, so a crash at any point leaves
//! either the old or the new file, never a torn one. A file that exists
//! but cannot be read or parsed is an error: it is never silently replaced.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::ground::secret::Secret;

/// What the state file holds.
#[derive(Clone, Serialize, Deserialize)]
pub struct State {
    /// The refresh token to use next.
    pub refresh_token: String,
    /// The `sub` claim of the last access token, when known.
    #[serde(default)]
    pub sub: Option<String>,
    /// Unix time the refresh token was obtained.
    pub obtained_at: u64,
    /// Unix time it was last exchanged.
    #[serde(default)]
    pub last_used_at: Option<u64>,
    /// Fingerprint of the configured `code` or `refresh_token` this state
    /// descends from: when the operator configures a new one, it wins.
    pub origin: String,
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("State")
            .field("refresh_token", &"***")
            .field("sub", &self.sub)
            .field("obtained_at", &self.obtained_at)
            .finish()
    }
}

pub use crate::ground::unix_now;

/// A stable, non-reversible fingerprint (FNV-1a 64) of a configured secret.
/// It only tells "same as before or not"; the file already holds the live
/// refresh token, so this reveals nothing more.
pub fn fingerprint(secret: &Secret) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in secret.expose().bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// Reads the state file; `Ok(None)` when it does not exist.
pub fn load(path: &Path) -> Result<Option<State>, String> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice::<State>(&bytes)
            .map(Some)
            .map_err(|e| format!("{} is corrupt ({e}); fix or remove it", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("cannot read {}: {e}", path.display())),
    }
}

/// Writes the state file atomically with mode 0600, creating its folder.
pub fn store(path: &Path, state: &State) -> Result<(), String> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp{}", std::process::id()));
    let json = serde_json::to_vec_pretty(state).map_err(|e| e.to_string())?;
    let write = || -> std::io::Result<()> {
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create(true).truncate(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
        let mut f = opts.open(&tmp)?;
        f.write_all(&json)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)?;
        // Make the rename itself durable.
        if let Ok(d) = std::fs::File::open(&dir) {
            let _ = d.sync_all();
        }
        Ok(())
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        format!("cannot write {}: {e}", path.display())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_with_mode_0600_and_missing_folder() {
        let dir = std::env::temp_dir().join(format!("fp-state-{}", std::process::id()));
        let path = dir.join("sub/flinks.json");
        let st = State {
            refresh_token: "rt".into(),
            sub: Some("u".into()),
            obtained_at: 1,
            last_used_at: None,
            origin: "x".into(),
        };
        store(&path, &st).unwrap();
        let back = load(&path).unwrap().unwrap();
        assert_eq!(back.refresh_token, "rt");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        std::fs::write(&path, "{not json").unwrap();
        assert!(load(&path).unwrap_err().contains("corrupt"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn debug_hides_the_refresh_token() {
        let st = State {
            refresh_token: "very-secret".into(),
            sub: None,
            obtained_at: 0,
            last_used_at: None,
            origin: String::new(),
        };
        assert!(!format!("{st:?}").contains("very-secret"));
    }
}
