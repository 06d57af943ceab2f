//! Request → connection: the id contract and the select header a pooled
//! request names its connection in. Owns parsing that one header; it
//! does not look the connection up.

use http::header::HeaderName;
use http::HeaderMap;

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

/// The connection a request named, its headers left as they are (the
/// proxy's rewrite leaves the select header out as it writes the head:
/// one lookup, no removal from the map, no copy).
pub fn named<'h>(headers: &'h HeaderMap, name: &HeaderName) -> Result<&'h str, PoolError> {
    let mut values = headers.get_all(name).iter();
    match (values.next(), values.next()) {
        (Some(v), None) => std::str::from_utf8(v.as_bytes())
            .ok()
            .filter(|id| valid_id(id)),
        _ => None,
    }
    .ok_or_else(|| PoolError::ConnectionRequired(name.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

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
    fn the_select_header_is_checked_and_left_in_place() {
        let name = HeaderName::from_static("x-flinks-connection");
        let mut h = HeaderMap::new();
        h.insert(&name, HeaderValue::from_static("alice"));
        assert_eq!(named(&h, &name).unwrap(), "alice");
        assert_eq!(h.len(), 1);
        for bad in [
            vec![],
            vec![""],
            vec!["a b"],
            vec!["alice", "bob"],
            vec!["é"],
        ] {
            let mut h = HeaderMap::new();
            for v in bad {
                h.append(&name, HeaderValue::from_str(v).unwrap());
            }
            assert!(matches!(
                named(&h, &name),
                Err(PoolError::ConnectionRequired(_))
            ));
        }
    }
}
