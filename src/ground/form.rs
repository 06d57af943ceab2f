//! `application/x-www-form-urlencoded` (WHATWG URL, "urlencoded"): the
//! encoding of token request bodies, authorize URLs and redirects, and the
//! decoding of callback queries.

/// Encodes one key or value: alphanumerics and `*-._~` as they are, a
/// space as `+`, every other byte `%XX`.
pub fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'*' | b'~' => {
                out.push(b as char)
            }
            b' ' => out.push('+'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// `k=v&k=v`, each encoded.
pub fn encode_pairs<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> String {
    let mut out = String::new();
    for (k, v) in pairs {
        if !out.is_empty() {
            out.push('&');
        }
        out.push_str(&encode(k));
        out.push('=');
        out.push_str(&encode(v));
    }
    out
}

/// Decodes one key or value: `+` is a space, `%XX` a byte; `None` when a
/// `%` escape is malformed or the bytes are not UTF-8.
pub fn decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        match b {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = bytes.get(i + 1..i + 3)?;
                let hex = std::str::from_utf8(hex).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 2;
            }
            _ => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).ok()
}

/// The pairs of a query string, decoded; `None` when any is malformed.
pub fn decode_pairs(query: &str) -> Option<Vec<(String, String)>> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            Some((decode(k)?, decode(v)?))
        })
        .collect()
}

/// `url` with `query` appended: after `?`, or `&` when it has a query
/// (nothing when that query is empty or ends with `&`).
pub fn with_query(url: &str, query: &str) -> String {
    let separator = match url.split_once('?') {
        None => "?",
        Some((_, q)) if q.is_empty() || q.ends_with('&') => "",
        Some(_) => "&",
    };
    format!("{url}{separator}{query}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_malformed_escapes() {
        let s = "a b&c=d/é%+";
        assert_eq!(decode(&encode(s)).as_deref(), Some(s));
        assert_eq!(encode("a b"), "a+b");
        assert_eq!(decode("%zz"), None);
        assert_eq!(decode("%4"), None);
        assert_eq!(decode("%ff"), None);
        assert_eq!(
            decode_pairs("state=x%2By&code=a+b&flag").unwrap(),
            vec![
                ("state".into(), "x+y".into()),
                ("code".into(), "a b".into()),
                ("flag".into(), String::new())
            ]
        );
        assert_eq!(with_query("https://a/?x=1", "y=2"), "https://a/?x=1&y=2");
        assert_eq!(with_query("https://a/", "y=2"), "https://a/?y=2");
    }
}
