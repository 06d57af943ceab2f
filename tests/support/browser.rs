//! A scripted browser for the connect flow: a cookie jar, redirects taken
//! by hand (each hop is asserted on), and the sandbox's consent page
//! filled in as a user would.

use std::collections::BTreeMap;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;

use flinks_proxy::ground::form;

use super::{client, send, HttpClient, Resp};

/// One browser: its own cookies.
pub struct Browser {
    client: HttpClient,
    /// name -> value, every cookie any answer set (and did not clear).
    pub cookies: BTreeMap<String, String>,
    /// name -> the cookie's `Path` (sent only to paths under it, as a
    /// browser does; "/" when the answer set none).
    pub paths: BTreeMap<String, String>,
    /// Every `Set-Cookie` line received, verbatim.
    pub set_cookie_lines: Vec<String>,
}

impl Default for Browser {
    fn default() -> Self {
        Browser::new()
    }
}

impl Browser {
    /// A browser with no cookies.
    pub fn new() -> Browser {
        Browser {
            client: client(),
            cookies: BTreeMap::new(),
            paths: BTreeMap::new(),
            set_cookie_lines: Vec::new(),
        }
    }

    fn remember(&mut self, r: &Resp) {
        for v in r.headers.get_all("set-cookie") {
            let line = v.to_str().expect("ASCII cookie").to_owned();
            let (pair, attrs) = line.split_once(';').unwrap_or((&line, ""));
            let (name, value) = pair.split_once('=').expect("name=value");
            let path = attrs
                .split(';')
                .find_map(|a| a.trim().strip_prefix("Path="))
                .unwrap_or("/");
            if attrs.to_ascii_lowercase().contains("max-age=0") {
                self.cookies.remove(name.trim());
            } else {
                self.cookies
                    .insert(name.trim().to_owned(), value.trim().to_owned());
                self.paths.insert(name.trim().to_owned(), path.to_owned());
            }
            self.set_cookie_lines.push(line);
        }
    }

    /// The `Cookie` header for `url`: the cookies whose `Path` is a prefix
    /// of its path at a `/` boundary (RFC 6265 §5.1.4; cookies set by hand
    /// in [`Browser::cookies`] go everywhere).
    fn cookie_header(&self, url: &str) -> Option<String> {
        let after = url.find("://").map_or(0, |i| i + 3);
        let path = url[after..].find('/').map_or("/", |i| &url[after + i..]);
        let path = path.split('?').next().unwrap_or("/");
        let matches = |cookie_path: &str| {
            path == cookie_path
                || path.starts_with(cookie_path)
                    && (cookie_path.ends_with('/') || path[cookie_path.len()..].starts_with('/'))
        };
        let sent: Vec<String> = self
            .cookies
            .iter()
            .filter(|(k, _)| self.paths.get(*k).is_none_or(|p| matches(p)))
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        (!sent.is_empty()).then(|| sent.join("; "))
    }

    /// GET `url` with the jar's cookies; no redirect is followed.
    pub async fn get(&mut self, url: &str) -> Resp {
        let mut req = Request::get(url);
        if let Some(c) = self.cookie_header(url) {
            req = req.header("cookie", c);
        }
        let r = send(&self.client, req.body(Full::default()).expect("request")).await;
        self.remember(&r);
        r
    }

    /// POSTs a form to `url`; no redirect is followed.
    pub async fn post_form(&mut self, url: &str, pairs: &[(&str, &str)]) -> Resp {
        let body = pairs
            .iter()
            .map(|(k, v)| format!("{}={}", form::encode(k), form::encode(v)))
            .collect::<Vec<_>>()
            .join("&");
        let mut req =
            Request::post(url).header("content-type", "application/x-www-form-urlencoded");
        if let Some(c) = self.cookie_header(url) {
            req = req.header("cookie", c);
        }
        let r = send(
            &self.client,
            req.body(Full::new(Bytes::from(body))).expect("request"),
        )
        .await;
        self.remember(&r);
        r
    }

    /// Opens the sandbox consent page at `authorize_url` and answers it as
    /// `user` (`approve` or deny); returns the redirect back to the app's
    /// callback.
    pub async fn consent(&mut self, authorize_url: &str, user: &str, approve: bool) -> String {
        let page = self.get(authorize_url).await;
        assert_eq!(page.status, 200, "consent page: {}", page.text());
        let html = page.text();
        let request = hidden_value(&html, "request").expect("the consent form's request field");
        let origin = origin(authorize_url);
        let action = form_action(&html).unwrap_or("/api/v1/authorize".to_owned());
        let decision = if approve { "approve" } else { "deny" };
        let r = self
            .post_form(
                &format!("{origin}{action}"),
                &[
                    ("request", &request),
                    ("user", user),
                    ("decision", decision),
                ],
            )
            .await;
        assert_eq!(r.status, 302, "consent answer: {}", r.text());
        r.header("location").expect("location").to_owned()
    }
}

/// `scheme://host:port` of a URL.
pub fn origin(url: &str) -> String {
    let after = url.find("://").map_or(0, |i| i + 3);
    let end = url[after..].find('/').map_or(url.len(), |i| after + i);
    url[..end].to_owned()
}

/// The value of `<input ... name="NAME" ... value="V">`.
fn hidden_value(html: &str, name: &str) -> Option<String> {
    let at = html.find(&format!("name=\"{name}\""))?;
    let start = html[..at].rfind('<')?;
    let end = at + html[at..].find('>')?;
    let tag = &html[start..end];
    let v = tag.find("value=\"")? + 7;
    let len = tag[v..].find('"')?;
    Some(tag[v..v + len].replace("&amp;", "&"))
}

/// The consent form's `action`.
fn form_action(html: &str) -> Option<String> {
    let at = html.find("<form")?;
    let tag = &html[at..at + html[at..].find('>')?];
    let v = tag.find("action=\"")? + 8;
    let len = tag[v..].find('"')?;
    Some(tag[v..v + len].replace("&amp;", "&"))
}

/// The decoded query parameters of a URL.
pub fn query_params(url: &str) -> BTreeMap<String, String> {
    let q = url.split_once('?').map_or("", |(_, q)| q);
    flinks_proxy::ground::form::decode_pairs(q)
        .expect("well-formed query")
        .into_iter()
        .collect()
}
