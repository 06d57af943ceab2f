//! Request → connection: the id contract and the select header a pooled
//! request names its connection in. Owns parsing that one header; it
//! does not look the connection up.

use http::header::HeaderName;
use http::{HeaderMap, HeaderValue};

use super::PoolError;

/// Longest connection id (CONNECTIONS.md).
pub const MAX_ID_LEN: usize = 128;

/// `1`-`128` of `[A-Za-z0-9._:@-]`.
pub fn valid_id(id: &str) -> bool {
    (1..=MAX_ID_LEN).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'@' | b'-'))
}

/// The connection a request named (taken out of its headers without
/// copying).
#[derive(Debug, Clone)]
pub struct ConnectionId(HeaderValue);

impl ConnectionId {
    /// The id.
    pub fn as_str(&self) -> &str {
        // Checked to be ASCII by `select`.
        self.0.to_str().unwrap_or("")
    }
}

/// The connection a request named, removed from its headers.
pub fn select(headers: &mut HeaderMap, name: &HeaderName) -> Result<ConnectionId, PoolError> {
    let id = named(headers, name);
    headers.remove(name);
    id
}

/// The connection a request named, its headers left as they are (the
/// proxy's rewrite leaves the select header out as it writes the head:
/// one lookup, no removal from the map).
pub fn named(headers: &HeaderMap, name: &HeaderName) -> Result<ConnectionId, PoolError> {
    let mut values = headers.get_all(name).iter();
    match (values.next(), values.next()) {
        (Some(v), None) if v.to_str().is_ok_and(valid_id) => Ok(ConnectionId(v.clone())),
        _ => Err(PoolError::ConnectionRequired(name.clone())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_follow_the_contract() {
        for ok in ["a", "user-1", "a.b_c:d@e-f", &"x".repeat(128)] {
            assert!(valid_id(ok), "{ok}");
        }
        for bad in ["", "a b", "a/b", "é", &"x".repeat(129), "a\0"] {
            assert!(!valid_id(bad), "{bad:?}");
        }
    }

    #[test]
    fn the_select_header_is_checked_and_removed() {
        let name = HeaderName::from_static("x-flinks-connection");
        let mut h = HeaderMap::new();
        h.insert(&name, HeaderValue::from_static("alice"));
        assert_eq!(select(&mut h, &name).unwrap().as_str(), "alice");
        assert!(h.is_empty());
        for bad in [vec![], vec![""], vec!["a b"], vec!["alice", "bob"]] {
            let mut h = HeaderMap::new();
            for v in bad {
                h.append(&name, HeaderValue::from_str(v).unwrap());
            }
            assert!(matches!(
                select(&mut h, &name),
                Err(PoolError::ConnectionRequired(_))
            ));
            assert!(h.is_empty());
        }
    }
}
