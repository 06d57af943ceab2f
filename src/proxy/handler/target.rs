//! The checks of a request's target before routing: a path with no dot
//! segments (plain or disguised), exactly one `Host` on HTTP/1.1, no
//! userinfo; and the host it is routed by.

use http::{header, Request, Version};
use hyper::body::Incoming;

use crate::proxy::error::ProxyError;

/// An authority without its port (a last `:` followed by digits only).
fn strip_port(authority: &str) -> &str {
    if authority.starts_with('[') {
        return authority.find(']').map_or(authority, |i| &authority[..=i]);
    }
    let b = authority.as_bytes();
    let digits = b.iter().rev().take_while(|c| c.is_ascii_digit()).count();
    match b.len().checked_sub(digits + 1) {
        Some(colon) if b.get(colon) == Some(&b':') => authority.get(..colon).unwrap_or(authority),
        _ => authority,
    }
}

/// A path that could climb out of a route's prefix once the upstream
/// normalises it (`/api/../admin`): `.` or `..` segments, plain or
/// percent-encoded, with a `;` path parameter (`..;x`, which Tomcat-style
/// servers read as `..`), or between backslashes or encoded slashes
/// (`..\`, `%2e%2e%2f`, `%5c`), which many servers treat as `/`.
fn has_dot_segments(path: &str) -> bool {
    // Fast path: nothing that could spell a dot segment.
    if !path.bytes().any(|b| matches!(b, b'.' | b'%' | b'\\')) {
        return false;
    }
    let decoded = decode_path_delimiters(path);
    decoded.split(['/', '\\']).any(|seg| {
        let seg = seg.split(';').next().unwrap_or(seg);
        seg == "." || seg == ".."
    })
}

/// `path` with the percent-encodings of `.`, `/`, `\` and `;` decoded
/// (any case); everything else as is.
fn decode_path_delimiters(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    let mut rest = path;
    while let Some(i) = rest.find('%') {
        out.push_str(&rest[..i]);
        let code = rest.get(i + 1..i + 3).map(str::to_ascii_lowercase);
        let decoded = match code.as_deref() {
            Some("2e") => Some('.'),
            Some("2f") => Some('/'),
            Some("5c") => Some('\\'),
            Some("3b") => Some(';'),
            _ => None,
        };
        match decoded {
            Some(c) => {
                out.push(c);
                rest = &rest[i + 3..];
            }
            None => {
                out.push('%');
                rest = &rest[i + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// Refuses targets the proxy will not route, and returns the host it is
/// routed by: the authority of an absolute-form or HTTP/2 target, else the
/// `Host` header; without port (as the client wrote it: the caller
/// lower-cases it).
pub(super) fn check_target(req: &Request<Incoming>) -> Result<Option<&str>, ProxyError> {
    let path = req.uri().path();
    if !path.starts_with('/') {
        return Err(ProxyError::BadRequest("the request target must be a path"));
    }
    if has_dot_segments(path) {
        return Err(ProxyError::BadRequest(
            "the path must not contain . or .. segments",
        ));
    }
    // RFC 9112 §3.2: a server MUST answer 400 to an HTTP/1.1 request without
    // Host or with more than one.
    let mut hosts = req.headers().get_all(header::HOST).iter();
    let host_header = hosts.next();
    if hosts.next().is_some() || (host_header.is_none() && req.version() == Version::HTTP_11) {
        return Err(ProxyError::BadRequest(
            "an HTTP/1.1 request needs exactly one Host header",
        ));
    }
    // RFC 9110 §4.2.4: userinfo in a target disguises the authority.
    let authority = req.uri().authority().map(|a| a.as_str());
    let userinfo = host_header.is_some_and(|h| h.as_bytes().contains(&b'@'))
        || authority.is_some_and(|a| a.contains('@'));
    if userinfo {
        return Err(ProxyError::BadRequest(
            "the request target must not carry user information",
        ));
    }
    let host = authority.or_else(|| host_header.and_then(|h| h.to_str().ok()));
    Ok(host.map(strip_port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_stripped_from_hosts() {
        assert_eq!(strip_port("example.com:8080"), "example.com");
        assert_eq!(strip_port("example.com"), "example.com");
        assert_eq!(strip_port("[::1]:80"), "[::1]");
        assert_eq!(strip_port("[::1]"), "[::1]");
        assert_eq!(strip_port("example.com:"), "example.com");
        assert_eq!(strip_port("a:b1"), "a:b1");
        assert_eq!(strip_port("8080"), "8080");
        assert_eq!(strip_port(":80"), "");
        assert_eq!(strip_port("a:1:2"), "a:1");
        assert_eq!(strip_port(""), "");
    }

    #[test]
    fn dot_segments_are_detected() {
        assert!(has_dot_segments("/api/../admin"));
        assert!(has_dot_segments("/api/%2e%2E/admin"));
        assert!(has_dot_segments("/api/./x"));
        assert!(has_dot_segments("/api/.."));
        assert!(!has_dot_segments("/api/v1.2/x"));
        assert!(!has_dot_segments("/api/..."));
        assert!(!has_dot_segments("/"));
        assert!(!has_dot_segments("/files/a%2Fb"));
        assert!(!has_dot_segments("/a/%2e%2e%2e/b"));
        assert!(!has_dot_segments("/a/..x;/b"));
        assert!(!has_dot_segments("/50%25/x"));
    }

    #[test]
    fn dot_segments_hidden_by_path_parameters_backslashes_and_encodings_are_detected() {
        for path in [
            "/api/..;/admin",
            "/api/..;jsessionid=1/admin",
            "/api/.;/x",
            "/api/..\\admin",
            "/api\\..\\admin",
            "/api/.%2e/admin",
            "/api/%2e%2e%3b/admin",
            "/api/%2E%2E%3Bx/admin",
            "/api/..%2fadmin",
            "/api%2f..%2fadmin",
            "/api/..%5cadmin",
            "/api%5C..",
            "/api/%2e",
        ] {
            assert!(has_dot_segments(path), "{path}");
        }
    }
}
