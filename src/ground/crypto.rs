//! Sealing tokens at rest: AES-256-GCM (ring) with a random 96-bit nonce
//! and, as associated data, the key id and the row's pool, id and field, so
//! a ciphertext copied to another row or field does not open.
//!
//! A sealed value is text: `v1:<key id>:<base64(nonce || ciphertext+tag)>`.
//! The key id is the first 8 hex digits of SHA-256 of the key, so a value
//! names the key that opens it. [`Sealer`] seals with the current key and
//! opens with the current or any old key. This module knows nothing about
//! where sealed values are kept.

use std::fmt;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};

use crate::ground::secret::Secret;

/// Format tag of sealed values; a new format gets a new tag.
const VERSION: &str = "v1";
/// Key length: AES-256.
pub const KEY_LEN: usize = 32;
/// What the fingerprint key is derived with (HMAC-SHA256 of this under the
/// store key), so the sealing key is never used for anything else.
const MAC_KEY_LABEL: &[u8] = b"flinks-proxy fingerprint key v1";

/// A store key: 32 bytes, with its id.
pub struct Key {
    id: String,
    key: LessSafeKey,
    /// Keys [`Sealer::fingerprints`]: derived from the key, never the key
    /// itself (one key, one purpose).
    mac: ring::hmac::Key,
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Key").field("id", &self.id).finish()
    }
}

impl PartialEq for Key {
    fn eq(&self, other: &Key) -> bool {
        self.id == other.id
    }
}

/// Why a value could not be sealed or opened. Never carries key material
/// or plaintext.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum CryptoError {
    /// The text is not `v1:<kid>:<base64>`.
    #[error("sealed value is malformed")]
    Malformed,
    /// No configured key has this id.
    #[error("sealed with key {0}, which is neither store.key nor one of store.old_keys")]
    UnknownKey(String),
    /// Authentication failed: wrong key, or the value belongs to another row.
    #[error("sealed value does not open (tampered with, or moved from another row)")]
    Open,
    /// The system random generator failed.
    #[error("cannot draw a random nonce")]
    Random,
}

impl Key {
    /// A key from the base64 text of 32 bytes (what `keygen` prints).
    pub fn from_base64(text: &str) -> Result<Key, String> {
        let bytes = STANDARD
            .decode(text.trim())
            .map_err(|_| "is not valid base64 (use `flinks-proxy keygen`)".to_owned())?;
        Key::from_bytes(&bytes)
    }

    /// A key from 32 raw bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<Key, String> {
        if bytes.len() != KEY_LEN {
            return Err(format!(
                "must be {KEY_LEN} bytes of base64, not {} bytes (use `flinks-proxy keygen`)",
                bytes.len()
            ));
        }
        let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
        let id = hex(&digest.as_ref()[..4]);
        let unbound =
            UnboundKey::new(&AES_256_GCM, bytes).map_err(|_| "unusable key".to_owned())?;
        let derive = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, bytes);
        let mac_key = ring::hmac::sign(&derive, MAC_KEY_LABEL);
        Ok(Key {
            id,
            key: LessSafeKey::new(unbound),
            mac: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, mac_key.as_ref()),
        })
    }

    /// Its id: 8 hex digits of SHA-256 of the key.
    pub fn id(&self) -> &str {
        &self.id
    }
}

/// A new random key as base64 (`flinks-proxy keygen`).
pub fn generate_key() -> Result<String, CryptoError> {
    Ok(STANDARD.encode(random_bytes::<KEY_LEN>()?))
}

/// `N` bytes from the OS random generator.
pub fn random_bytes<const N: usize>() -> Result<[u8; N], CryptoError> {
    let mut bytes = [0u8; N];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| CryptoError::Random)?;
    Ok(bytes)
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Where a sealed value belongs: its row and field.
#[derive(Debug, Clone, Copy)]
pub struct Place<'a> {
    /// The pool.
    pub pool: &'a str,
    /// The connection id.
    pub id: &'a str,
    /// `refresh_token`, `access_token`, `canary`.
    pub field: &'a str,
}

fn aad(kid: &str, place: Place<'_>) -> Vec<u8> {
    // NUL cannot occur in any part (ids and pool names are restricted), so
    // the concatenation is unambiguous.
    [kid, place.pool, place.id, place.field]
        .join("\0")
        .into_bytes()
}

/// Seals with the current key; opens with the current or an old key.
#[derive(Debug)]
pub struct Sealer {
    current: Key,
    old: Vec<Key>,
    rng: SystemRandom,
}

impl Sealer {
    /// A sealer writing with `current` and also reading `old`.
    pub fn new(current: Key, old: Vec<Key>) -> Sealer {
        Sealer {
            current,
            old,
            rng: SystemRandom::new(),
        }
    }

    /// The id of the key new values are sealed with.
    pub fn current_id(&self) -> &str {
        self.current.id()
    }

    /// Keyed fingerprints of `value` (HMAC-SHA256, 32 hex digits), under
    /// the current key first, then each old key: a stable name for a
    /// configured secret that reveals nothing about it without the key.
    /// The old keys' fingerprints find what was stored before a rotation.
    pub fn fingerprints(&self, value: &[u8]) -> Vec<String> {
        std::iter::once(&self.current)
            .chain(&self.old)
            .map(|k| hex(&ring::hmac::sign(&k.mac, value).as_ref()[..16]))
            .collect()
    }

    /// Every key id this sealer can open.
    pub fn known_ids(&self) -> Vec<&str> {
        std::iter::once(&self.current)
            .chain(&self.old)
            .map(Key::id)
            .collect()
    }

    /// Seals `plaintext` for `place`.
    pub fn seal(&self, place: Place<'_>, plaintext: &[u8]) -> Result<String, CryptoError> {
        let mut nonce = [0u8; NONCE_LEN];
        self.rng.fill(&mut nonce).map_err(|_| CryptoError::Random)?;
        let mut buf = plaintext.to_vec();
        self.current
            .key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad(self.current.id(), place)),
                &mut buf,
            )
            .map_err(|_| CryptoError::Random)?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&buf);
        Ok(format!(
            "{VERSION}:{}:{}",
            self.current.id(),
            STANDARD.encode(out)
        ))
    }

    /// Opens a value sealed for `place`.
    pub fn open(&self, place: Place<'_>, sealed: &str) -> Result<Vec<u8>, CryptoError> {
        let mut parts = sealed.splitn(3, ':');
        let (Some(VERSION), Some(kid), Some(b64)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(CryptoError::Malformed);
        };
        let key = self
            .key_by_id(kid)
            .ok_or_else(|| CryptoError::UnknownKey(kid.to_owned()))?;
        let mut raw = STANDARD.decode(b64).map_err(|_| CryptoError::Malformed)?;
        if raw.len() < NONCE_LEN {
            return Err(CryptoError::Malformed);
        }
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&raw[..NONCE_LEN]);
        let plain = key
            .key
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad(kid, place)),
                &mut raw[NONCE_LEN..],
            )
            .map_err(|_| CryptoError::Open)?;
        Ok(plain.to_vec())
    }

    /// Opens a sealed token into a [`Secret`].
    pub fn open_secret(&self, place: Place<'_>, sealed: &str) -> Result<Secret, CryptoError> {
        let bytes = self.open(place, sealed)?;
        String::from_utf8(bytes)
            .map(Secret::new)
            .map_err(|_| CryptoError::Malformed)
    }

    /// The key id a sealed value names, if it is well formed.
    pub fn key_id_of(sealed: &str) -> Option<&str> {
        let mut parts = sealed.splitn(3, ':');
        (parts.next() == Some(VERSION))
            .then(|| parts.next())
            .flatten()
    }

    fn key_by_id(&self, kid: &str) -> Option<&Key> {
        std::iter::once(&self.current)
            .chain(&self.old)
            .find(|k| k.id() == kid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8) -> Key {
        Key::from_bytes(&[b; KEY_LEN]).unwrap()
    }

    const ROW: Place<'static> = Place {
        pool: "users",
        id: "alice",
        field: "refresh_token",
    };

    #[test]
    fn sealed_values_open_in_their_own_row_only() {
        let s = Sealer::new(key(1), vec![]);
        let sealed = s.seal(ROW, b"rt-secret").unwrap();
        assert!(sealed.starts_with(&format!("v1:{}:", s.current_id())));
        assert!(!sealed.contains("rt-secret"));
        assert_eq!(s.open(ROW, &sealed).unwrap(), b"rt-secret");
        let other_id = Place { id: "bob", ..ROW };
        assert_eq!(s.open(other_id, &sealed), Err(CryptoError::Open));
        let other_pool = Place { pool: "p2", ..ROW };
        assert_eq!(s.open(other_pool, &sealed), Err(CryptoError::Open));
        let other_field = Place {
            field: "access_token",
            ..ROW
        };
        assert_eq!(s.open(other_field, &sealed), Err(CryptoError::Open));
    }

    #[test]
    fn nonces_are_random() {
        let s = Sealer::new(key(1), vec![]);
        assert_ne!(s.seal(ROW, b"x").unwrap(), s.seal(ROW, b"x").unwrap());
    }

    #[test]
    fn old_keys_open_and_unknown_keys_are_named() {
        let old = Sealer::new(key(1), vec![]);
        let sealed = old.seal(ROW, b"v").unwrap();
        let rotated = Sealer::new(key(2), vec![key(1)]);
        assert_eq!(rotated.open(ROW, &sealed).unwrap(), b"v");
        assert!(rotated
            .seal(ROW, b"v")
            .unwrap()
            .contains(rotated.current_id()));
        let other = Sealer::new(key(3), vec![]);
        let e = other.open(ROW, &sealed).unwrap_err();
        assert_eq!(e, CryptoError::UnknownKey(key(1).id().to_owned()));
    }

    #[test]
    fn tampering_and_garbage_fail_cleanly() {
        let s = Sealer::new(key(1), vec![]);
        let sealed = s.seal(ROW, b"value").unwrap();
        let mut bytes = sealed.into_bytes();
        let last = bytes.len() - 3;
        bytes[last] = if bytes[last] == b'A' { b'B' } else { b'A' };
        let tampered = String::from_utf8(bytes).unwrap();
        assert!(s.open(ROW, &tampered).is_err());
        for bad in ["", "v1", "v2:x:y", "v1:nokey", "v1:abc:!!!"] {
            assert!(s.open(ROW, bad).is_err(), "{bad}");
        }
        let kid = s.current_id().to_owned();
        assert_eq!(
            s.open(ROW, &format!("v1:{kid}:AAAA")),
            Err(CryptoError::Malformed)
        );
    }

    #[test]
    fn keys_must_be_32_bytes_of_base64() {
        assert!(Key::from_base64("not base64!").is_err());
        let e = Key::from_base64(&STANDARD.encode([0u8; 16])).unwrap_err();
        assert!(e.contains("32 bytes"), "{e}");
        let k = generate_key().unwrap();
        assert_eq!(Key::from_base64(&k).unwrap().id().len(), 8);
        assert_ne!(generate_key().unwrap(), k);
    }
}
