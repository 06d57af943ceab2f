//! The operator page's HTML: one layout with one inline style (allowed by
//! its hash; no script), every value escaped with the connect pages'
//! [`escape`], the headers every answer carries, and the 303s. What a page
//! says is its caller's.

use std::sync::LazyLock;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};

pub(super) use crate::connect::pages::escape;
use crate::connect::pages::harden;
use crate::proxy::body::ProxyBody;

const STYLE: &str = "body{font:15px/1.45 system-ui,sans-serif;margin:0;color:#1d2330;background:#f6f7f9}\
header{display:flex;justify-content:space-between;align-items:center;padding:.6em 1.5em;background:#1d2330;color:#fff}\
header a{color:#fff;text-decoration:none;font-weight:600}\
main{max-width:72em;margin:1.5em auto;padding:0 1.5em}h1{font-size:1.35em}h2{font-size:1.1em;margin-top:1.8em}\
table{border-collapse:collapse;width:100%;background:#fff}th,td{text-align:left;padding:.4em .6em;border-bottom:1px solid #dde1e7;vertical-align:top}\
th{font-size:.85em;color:#5a6372;font-weight:600}td.num{font-variant-numeric:tabular-nums}\
.state-active{color:#17753a}.state-needs_reauthorization{color:#b0401c;font-weight:600}\
.err{color:#b0401c;font-size:.9em}.muted{color:#5a6372;font-size:.9em}\
form.inline{display:inline;margin:0}button{font:inherit;padding:.2em .7em;border:1px solid #8a93a3;border-radius:4px;background:#fff;cursor:pointer}\
button.danger{border-color:#b0401c;color:#b0401c}input[type=search],input[type=password],input.link{font:inherit;padding:.3em .5em;border:1px solid #8a93a3;border-radius:4px}\
input.link{width:100%;box-sizing:border-box;font-family:ui-monospace,monospace}nav.pages{margin-top:.8em}nav.pages a{margin-right:1em}\
a.current{font-weight:700}th,td.actions{white-space:nowrap}";

/// `default-src 'none'` with the one style allowed by its SHA-256, forms
/// posting only to this origin, no framing.
static CSP: LazyLock<HeaderValue> = LazyLock::new(|| {
    let hash = STANDARD.encode(ring::digest::digest(
        &ring::digest::SHA256,
        STYLE.as_bytes(),
    ));
    let csp = format!(
        "default-src 'none'; style-src 'sha256-{hash}'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    );
    HeaderValue::from_str(&csp).expect("ASCII policy")
});

/// The connect pages' headers (no caching, no referrer, no framing), with
/// this page's CSP instead of theirs (which allows no form).
fn headers(r: &mut Response<ProxyBody>) {
    harden(r.headers_mut());
    r.headers_mut()
        .insert(header::CONTENT_SECURITY_POLICY, CSP.clone());
}

/// A page: `title` (escaped) and `body` (HTML the caller escaped). With
/// `csrf` (signed in), the header carries the logout form.
pub(super) fn page(
    status: StatusCode,
    title: &str,
    body: &str,
    csrf: Option<&str>,
) -> Response<ProxyBody> {
    let logout = csrf.map_or_else(String::new, |c| {
        format!(
            "<form class=\"inline\" method=\"post\" action=\"/ui/logout\">{}\
             <button type=\"submit\" id=\"logout\">Log out</button></form>",
            csrf_field(c)
        )
    });
    let html = format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width\">\
         <title>{t} · flinks-proxy</title><style>{STYLE}</style></head>\n\
         <body><header><a href=\"/ui\">flinks-proxy · connections</a>{logout}</header>\n\
         <main><h1>{t}</h1>\n{body}</main></body></html>\n",
        t = escape(title)
    );
    let mut r = Response::new(ProxyBody::full(Bytes::from(html)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    headers(&mut r);
    r
}

/// A page of one paragraph of `text` (escaped) and a link back to `/ui`.
pub(super) fn message(
    status: StatusCode,
    title: &str,
    text: &str,
    csrf: Option<&str>,
) -> Response<ProxyBody> {
    let body = format!(
        "<p>{}</p>\n<p><a href=\"/ui\">Back to the connections</a></p>\n",
        escape(text)
    );
    page(status, title, &body, csrf)
}

/// A 303 to `location` (a path of ours), setting `cookies`.
pub(super) fn see_other(location: &'static str, cookies: &[HeaderValue]) -> Response<ProxyBody> {
    let mut r = Response::new(ProxyBody::full(Bytes::new()));
    *r.status_mut() = StatusCode::SEE_OTHER;
    r.headers_mut()
        .insert(header::LOCATION, HeaderValue::from_static(location));
    for c in cookies {
        r.headers_mut().append(header::SET_COOKIE, c.clone());
    }
    headers(&mut r);
    r
}

/// The hidden CSRF field every POST form carries.
pub(super) fn csrf_field(csrf: &str) -> String {
    format!(
        "<input type=\"hidden\" name=\"csrf\" value=\"{}\">",
        escape(csrf)
    )
}

/// A hidden field.
pub(super) fn hidden(name: &str, value: &str) -> String {
    format!(
        "<input type=\"hidden\" name=\"{}\" value=\"{}\">",
        escape(name),
        escape(value)
    )
}

/// An age in milliseconds, coarsely: `3d 4h`, `5h 12m`, `7m`, `12s`.
pub(super) fn age(ms: i64) -> String {
    let s = ms.max(0) / 1000;
    let (d, h, m) = (s / 86_400, s % 86_400 / 3600, s % 3600 / 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, m) => format!("{m}m"),
        (0, h, m) => format!("{h}h {m}m"),
        (d, h, _) => format!("{d}d {h}h"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_are_coarse() {
        assert_eq!(age(-5), "0s");
        assert_eq!(age(12_999), "12s");
        assert_eq!(age(7 * 60_000 + 1), "7m");
        assert_eq!(age((5 * 3600 + 12 * 60) * 1000), "5h 12m");
        assert_eq!(age((3 * 86_400 + 4 * 3600 + 59) * 1000), "3d 4h");
    }

    #[test]
    fn pages_allow_forms_to_this_origin_only_and_no_script() {
        let r = page(StatusCode::OK, "<x>", "<p>ok</p>", Some("c\""));
        let csp = r.headers()[header::CONTENT_SECURITY_POLICY]
            .to_str()
            .unwrap();
        assert!(
            csp.starts_with("default-src 'none'; style-src 'sha256-"),
            "{csp}"
        );
        assert!(csp.contains("form-action 'self'"), "{csp}");
        assert!(!csp.contains("script-src"), "{csp}");
        assert_eq!(r.headers()[header::CACHE_CONTROL], "no-store");
        assert_eq!(r.headers()[header::X_FRAME_OPTIONS], "DENY");
    }
}
