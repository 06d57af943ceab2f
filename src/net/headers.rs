//! Header policy: which headers are hop-by-hop, which the proxy manages
//! itself (a route cannot carry its token in them), the request id, and the
//! rewrite of a client's request headers into the upstream's (SPEC §5).
//!
//! Pure functions over `http` types: used by `config` (reserved names) and
//! `proxy` (the rewrite). Routing, tokens and bodies live elsewhere; the
//! token header itself is set by `proxy` after the rewrite.

use http::header::{self, HeaderName};
use http::{HeaderMap, HeaderValue};

/// `x-request-id`.
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// `x-forwarded-for`.
pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
/// `x-forwarded-proto`.
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
/// `x-forwarded-host`.
pub static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
/// RFC 7239 `forwarded`: removed from requests (see [`rewrite_request`]).
pub static FORWARDED: HeaderName = HeaderName::from_static("forwarded");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
/// Longest client request id kept; longer ones are replaced.
const MAX_REQUEST_ID_LEN: usize = 128;
/// Headers the rewrite adds: Host, X-Forwarded-For/-Proto/-Host,
/// x-request-id, and the token header `proxy` sets afterwards.
const ADDED_HEADERS: usize = 6;

/// Headers the proxy manages itself; a route cannot put its token in them.
pub fn is_reserved_header(name: &HeaderName) -> bool {
    is_hop_by_hop(name)
        || name == header::HOST
        || name == header::PROXY_AUTHORIZATION
        || name == header::CONTENT_LENGTH
        || name == X_REQUEST_ID
        || name == X_FORWARDED_FOR
        || name == X_FORWARDED_PROTO
        || name == X_FORWARDED_HOST
        || name == FORWARDED
}

/// The fixed hop-by-hop set (RFC 9110 §7.6.1, plus `Proxy-Connection`).
pub fn is_hop_by_hop(name: &HeaderName) -> bool {
    name == header::CONNECTION
        || name == KEEP_ALIVE
        || name == PROXY_CONNECTION
        || name == header::TE
        || name == header::TRAILER
        || name == header::TRANSFER_ENCODING
        || name == header::UPGRADE
}

/// Header names a `Connection` header's value lists, without the `close`
/// and `keep-alive` options (and `connection` itself); requests' and
/// responses' (the upstream wire's parser) alike.
pub(crate) fn connection_listed(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|&b| b == b',')
        .map(<[u8]>::trim_ascii)
        .filter(|t| {
            !t.is_empty()
                && !t.eq_ignore_ascii_case(b"close")
                && !t.eq_ignore_ascii_case(b"keep-alive")
                && !t.eq_ignore_ascii_case(b"connection")
        })
}

/// The fixed hop-by-hop set, `Connection` first.
static HOP_BY_HOP: [&HeaderName; 7] = [
    &header::CONNECTION,
    &KEEP_ALIVE,
    &PROXY_CONNECTION,
    &header::TE,
    &header::TRAILER,
    &header::TRANSFER_ENCODING,
    &header::UPGRADE,
];

/// Removes hop-by-hop headers from a response: the fixed set and those any
/// `Connection` header lists.
pub fn remove_hop_by_hop(headers: &mut HeaderMap) {
    // One pass over the names, without hashing, finds the hop-by-hop ones
    // present (an upstream's response usually has just `Connection`); only
    // those are removed, by hashed lookup.
    let mut present = 0u8;
    for name in headers.keys() {
        if let Some(i) = HOP_BY_HOP.iter().position(|h| *h == name) {
            present |= 1 << i;
        }
    }
    if present == 0 {
        return;
    }
    if present & 1 != 0 {
        // Names listed in Connection, removed by `&str` (no allocation).
        // Each value is cloned first (shared bytes, no copy) because the map
        // cannot stay borrowed while names are removed from it.
        let listed = headers.get_all(header::CONNECTION).iter().count();
        for i in 0..listed {
            let Some(value) = headers.get_all(header::CONNECTION).iter().nth(i).cloned() else {
                break;
            };
            for token in connection_listed(value.as_bytes()) {
                if let Ok(name) = std::str::from_utf8(token) {
                    headers.remove(name);
                }
            }
        }
    }
    for (i, name) in HOP_BY_HOP.iter().enumerate() {
        if present & (1 << i) != 0 {
            headers.remove(*name);
        }
    }
}

/// The client's request id if sane (printable ASCII without spaces, at most
/// 128 bytes), else a new random one.
pub fn request_id(headers: &HeaderMap) -> HeaderValue {
    if let Some(v) = headers.get(&X_REQUEST_ID) {
        let b = v.as_bytes();
        if !b.is_empty() && b.len() <= MAX_REQUEST_ID_LEN && b.iter().all(|c| c.is_ascii_graphic())
        {
            return v.clone();
        }
    }
    new_request_id()
}

/// Request ids made at once: one allocation per batch instead of one per
/// request (each id shares the batch's bytes).
const ID_BATCH: usize = 64;
/// Hex digits in a generated request id (128 random bits).
const ID_LEN: usize = 32;

thread_local! {
    /// This thread's batch of fresh request ids and how much of it is used.
    /// Per thread rather than in `AppState`: it is a cache of random bytes,
    /// like `rand`'s own thread-local generator, with no state to share.
    static IDS: std::cell::RefCell<(bytes::Bytes, usize)> =
        const { std::cell::RefCell::new((bytes::Bytes::new(), 0)) };
}

fn new_request_id() -> HeaderValue {
    IDS.with(|ids| {
        let mut ids = ids.borrow_mut();
        let (batch, used) = &mut *ids;
        if *used + ID_LEN > batch.len() {
            *batch = id_batch();
            *used = 0;
        }
        let id = batch.slice(*used..*used + ID_LEN);
        *used += ID_LEN;
        HeaderValue::from_maybe_shared(id).unwrap_or_else(|_| HeaderValue::from_static("0"))
    })
}

/// [`ID_BATCH`] random ids of [`ID_LEN`] hex digits, back to back.
fn id_batch() -> bytes::Bytes {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut buf = Vec::with_capacity(ID_BATCH * ID_LEN);
    for _ in 0..ID_BATCH {
        let n: u128 = rand::random();
        buf.extend((0..ID_LEN).map(|i| HEX[((n >> (i * 4)) & 0xf) as usize]));
    }
    bytes::Bytes::from(buf)
}

/// What the rewrite adds to a request, decided by `proxy`: applied as the
/// head is written ([`write_request`]), or to a new map
/// ([`rewrite_request`]) for HTTP/2.
#[derive(Debug, Clone, Copy)]
pub struct Forwarding<'a> {
    /// The `Host` sent upstream (the upstream authority, or the client's
    /// host with `preserve_host`).
    pub host: &'a HeaderValue,
    /// The host the client asked for (`X-Forwarded-Host`), if it sent one.
    pub original_host: Option<&'a HeaderValue>,
    /// The client's address, as an `X-Forwarded-For` element.
    pub peer: &'a HeaderValue,
    /// Whether the client connected over TLS (`X-Forwarded-Proto`).
    pub tls: bool,
    /// The request id (`x-request-id`).
    pub request_id: &'a HeaderValue,
    /// One more client header removed: a pool's select header, which names
    /// the connection to the proxy and is not the upstream's business.
    pub remove: Option<&'a HeaderName>,
}

/// Whether a client header is dropped by the rewrite: hop-by-hop, client
/// credentials, and everything the proxy sets itself.
fn dropped(name: &HeaderName) -> bool {
    is_hop_by_hop(name)
        || name == header::AUTHORIZATION
        || name == header::PROXY_AUTHORIZATION
        || name == header::HOST
        || name == X_FORWARDED_PROTO
        || name == X_FORWARDED_HOST
        || name == X_REQUEST_ID
        || name == FORWARDED
}

/// Names a client's `Connection` headers list (hop-by-hop too). Rare:
/// nothing is allocated when there are none.
fn listed_names(client: &HeaderMap) -> Vec<HeaderName> {
    client
        .get_all(header::CONNECTION)
        .iter()
        .flat_map(|v| connection_listed(v.as_bytes()))
        .filter_map(|t| HeaderName::from_bytes(t).ok())
        .collect()
}

/// The upstream request headers, built in one pass over the client's:
/// hop-by-hop headers (and those `Connection` lists), `Authorization`,
/// `Proxy-Authorization`, `Forwarded` and [`Forwarding::remove`] out;
/// `Host`, `X-Forwarded-*` and `x-request-id` set. `X-Forwarded-For` is
/// every client `X-Forwarded-For` header, in order, then the peer.
///
/// A client's `Forwarded` header is removed, not rewritten: it is a claim
/// the proxy cannot check, frameworks prefer it over `X-Forwarded-*`, and
/// the `X-Forwarded-*` headers of SPEC §5 already say what it would.
///
/// [`write_request`] writes the same headers straight into an HTTP/1.1
/// head; the two are tested to agree.
pub fn rewrite_request(client: HeaderMap, f: &Forwarding<'_>) -> HeaderMap {
    let mut out = HeaderMap::with_capacity(client.len() + ADDED_HEADERS);
    let listed = listed_names(&client);
    let mut xff: Option<Vec<u8>> = None;
    let mut current: Option<HeaderName> = None;
    let mut skip = false;
    // Owned iteration: each name comes once, then `None` for its further
    // values; values move into the new map without a copy.
    for (name, value) in client {
        if let Some(name) = name {
            skip = dropped(&name) || listed.contains(&name) || f.remove == Some(&name);
            current = Some(name);
        }
        let Some(name) = current.as_ref() else {
            continue;
        };
        if skip {
            continue;
        }
        if name == X_FORWARDED_FOR {
            let buf = xff.get_or_insert_with(Vec::new);
            if !buf.is_empty() {
                buf.extend_from_slice(b", ");
            }
            buf.extend_from_slice(value.as_bytes());
        } else {
            out.append(name.clone(), value);
        }
    }
    out.insert(header::HOST, f.host.clone());
    let xff = match xff {
        Some(mut chain) => {
            chain.extend_from_slice(b", ");
            chain.extend_from_slice(f.peer.as_bytes());
            HeaderValue::from_bytes(&chain).unwrap_or_else(|_| f.peer.clone())
        }
        None => f.peer.clone(),
    };
    out.insert(X_FORWARDED_FOR.clone(), xff);
    out.insert(X_FORWARDED_PROTO.clone(), forwarded_proto(f.tls));
    if let Some(h) = f.original_host {
        out.insert(X_FORWARDED_HOST.clone(), h.clone());
    }
    out.insert(X_REQUEST_ID.clone(), f.request_id.clone());
    out
}

fn forwarded_proto(tls: bool) -> HeaderValue {
    HeaderValue::from_static(if tls { "https" } else { "http" })
}

/// Writes the header lines of [`rewrite_request`]`(client, f)` into an
/// HTTP/1.1 head, without building that map: the client's headers are
/// read in place. `set` are headers the proxy sets after the rewrite (the
/// token, a DPoP proof): any client header of those names is left out.
/// `skip` says which further names not to write (the head's framing).
/// Only the order of lines with different names differs from the map's
/// (`X-Forwarded-For` comes where the client had it).
pub fn write_request(
    out: &mut bytes::BytesMut,
    client: &HeaderMap,
    f: &Forwarding<'_>,
    set: &[Option<(HeaderName, HeaderValue)>],
    skip: impl Fn(&HeaderName) -> bool,
) {
    let listed = listed_names(client);
    let replaced = |name: &HeaderName| set.iter().flatten().any(|(n, _)| n == name);
    let mut xff_open = false;
    let mut wrote_xff = false;
    let mut current: *const HeaderName = std::ptr::null();
    let mut keep = false;
    for (name, value) in client {
        // The values of one name come together, under one key: a new key
        // is a new name.
        if !std::ptr::eq(current, name) {
            if xff_open {
                close_xff(out, f);
                xff_open = false;
            }
            current = name;
            keep = !(dropped(name)
                || listed.contains(name)
                || f.remove == Some(name)
                || replaced(name)
                || skip(name));
            if keep && name == X_FORWARDED_FOR {
                // Every value of a name comes together: one line, the
                // client's chain then the peer.
                out.extend_from_slice(b"x-forwarded-for: ");
                out.extend_from_slice(value.as_bytes());
                xff_open = true;
                wrote_xff = true;
                continue;
            }
        } else if xff_open {
            out.extend_from_slice(b", ");
            out.extend_from_slice(value.as_bytes());
            continue;
        }
        if keep {
            line(out, name.as_str().as_bytes(), value.as_bytes());
        }
    }
    if xff_open {
        close_xff(out, f);
    }
    line(out, b"host", f.host.as_bytes());
    if !wrote_xff {
        line(out, b"x-forwarded-for", f.peer.as_bytes());
    }
    line(out, b"x-forwarded-proto", forwarded_proto(f.tls).as_bytes());
    if let Some(h) = f.original_host {
        line(out, b"x-forwarded-host", h.as_bytes());
    }
    line(out, b"x-request-id", f.request_id.as_bytes());
    for (name, value) in set.iter().flatten() {
        line(out, name.as_str().as_bytes(), value.as_bytes());
    }
}

/// Ends the `X-Forwarded-For` line: the peer last.
fn close_xff(out: &mut bytes::BytesMut, f: &Forwarding<'_>) {
    out.extend_from_slice(b", ");
    out.extend_from_slice(f.peer.as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// One header line.
#[inline]
pub(crate) fn line(out: &mut bytes::BytesMut, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_and_listed_ones_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("close, x-secret-hop"),
        );
        h.insert("x-secret-hop", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert(header::TRAILER, HeaderValue::from_static("x"));
        h.insert("x-keep", HeaderValue::from_static("1"));
        h.append(header::CONNECTION, HeaderValue::from_static("X-Second-Hop"));
        h.insert("x-second-hop", HeaderValue::from_static("1"));
        let rewritten = rewrite(h.clone(), &forwarding());
        remove_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key("x-keep"));
        for gone in [
            "x-secret-hop",
            "x-second-hop",
            "keep-alive",
            "te",
            "upgrade",
        ] {
            assert!(!rewritten.contains_key(gone), "{gone}: {rewritten:?}");
        }
        assert_eq!(rewritten["x-keep"], "1");
    }

    static HOST: HeaderValue = HeaderValue::from_static("upstream.example:8443");
    static ORIGINAL: HeaderValue = HeaderValue::from_static("proxy.example");
    static PEER: HeaderValue = HeaderValue::from_static("192.0.2.7");
    static RID: HeaderValue = HeaderValue::from_static("rid-1");

    /// The headers `write_request` writes, parsed back.
    fn written(
        client: &HeaderMap,
        f: &Forwarding<'_>,
        set: &[Option<(HeaderName, HeaderValue)>],
    ) -> HeaderMap {
        let mut out = bytes::BytesMut::from(&b"GET / HTTP/1.1\r\n"[..]);
        write_request(&mut out, client, f, set, |n| n == header::CONTENT_LENGTH);
        out.extend_from_slice(b"\r\n");
        let mut slots = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut slots);
        assert!(req.parse(&out).expect("a valid head").is_complete());
        let mut map = HeaderMap::new();
        for h in req.headers.iter() {
            map.append(
                HeaderName::from_bytes(h.name.as_bytes()).unwrap(),
                HeaderValue::from_bytes(h.value).unwrap(),
            );
        }
        map
    }

    /// `rewrite_request`, checked to agree with what `write_request` writes.
    fn rewrite(client: HeaderMap, f: &Forwarding<'_>) -> HeaderMap {
        let direct = written(&client, f, &[]);
        let mut map = rewrite_request(client, f);
        map.remove(header::CONTENT_LENGTH);
        assert_eq!(direct, map);
        map
    }

    fn forwarding() -> Forwarding<'static> {
        Forwarding {
            host: &HOST,
            original_host: Some(&ORIGINAL),
            peer: &PEER,
            tls: true,
            request_id: &RID,
            remove: None,
        }
    }

    #[test]
    fn every_x_forwarded_for_header_is_kept_in_order_then_the_peer() {
        let mut h = HeaderMap::new();
        h.append("x-forwarded-for", HeaderValue::from_static("10.0.0.1"));
        h.append("x-other", HeaderValue::from_static("a"));
        h.append(
            "x-forwarded-for",
            HeaderValue::from_static("10.0.0.2, 10.0.0.3"),
        );
        let out = rewrite(h, &forwarding());
        let xff: Vec<_> = out.get_all("x-forwarded-for").iter().collect();
        assert_eq!(xff, ["10.0.0.1, 10.0.0.2, 10.0.0.3, 192.0.2.7"]);
        assert_eq!(out["x-other"], "a");
    }

    #[test]
    fn client_credentials_forwarded_and_proxy_managed_headers_are_replaced() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("evil.example"));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer x"));
        h.insert(
            header::PROXY_AUTHORIZATION,
            HeaderValue::from_static("Bearer k"),
        );
        h.insert("forwarded", HeaderValue::from_static("for=1.2.3.4;host=a"));
        h.insert("x-forwarded-host", HeaderValue::from_static("spoofed"));
        h.insert("x-forwarded-proto", HeaderValue::from_static("gopher"));
        h.insert("x-request-id", HeaderValue::from_static("old"));
        h.append("accept", HeaderValue::from_static("a/b"));
        h.append("accept", HeaderValue::from_static("c/d"));
        let out = rewrite(h, &forwarding());
        assert_eq!(out[header::HOST], "upstream.example:8443");
        assert!(!out.contains_key(header::AUTHORIZATION));
        assert!(!out.contains_key(header::PROXY_AUTHORIZATION));
        assert!(!out.contains_key("forwarded"));
        assert_eq!(out["x-forwarded-host"], "proxy.example");
        assert_eq!(out["x-forwarded-proto"], "https");
        assert_eq!(out["x-forwarded-for"], "192.0.2.7");
        assert_eq!(out["x-request-id"], "rid-1");
        let accept: Vec<_> = out.get_all("accept").iter().collect();
        assert_eq!(accept, ["a/b", "c/d"]);
        assert_eq!(out.len(), 7, "{out:?}");
    }

    #[test]
    fn no_client_host_means_no_x_forwarded_host() {
        let f = Forwarding {
            original_host: None,
            ..forwarding()
        };
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-host", HeaderValue::from_static("spoofed"));
        let out = rewrite(h, &f);
        assert!(!out.contains_key("x-forwarded-host"), "{out:?}");
    }

    #[test]
    fn the_select_header_and_set_headers_replace_the_clients() {
        let select = HeaderName::from_static("x-flinks-connection");
        let token = HeaderName::from_static("x-api-key");
        let mut h = HeaderMap::new();
        h.insert(&select, HeaderValue::from_static("alice"));
        h.append(&token, HeaderValue::from_static("client-1"));
        h.append(&token, HeaderValue::from_static("client-2"));
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("5"));
        h.insert("x-keep", HeaderValue::from_static("1"));
        let f = Forwarding {
            remove: Some(&select),
            ..forwarding()
        };
        let out = rewrite(h.clone(), &f);
        assert!(!out.contains_key(&select), "{out:?}");
        let set = [
            Some((token.clone(), HeaderValue::from_static("proxy"))),
            None,
        ];
        let direct = written(&h, &f, &set);
        let mut expected = out;
        expected.insert(&token, HeaderValue::from_static("proxy"));
        assert_eq!(direct, expected);
        assert_eq!(direct.get_all(&token).iter().count(), 1);
        assert!(!direct.contains_key(header::CONTENT_LENGTH));
    }

    #[test]
    fn written_heads_agree_with_the_rewritten_map() {
        // Names in several orders, repeated, some dropped, X-Forwarded-For
        // first, in the middle, last, listed in Connection or not.
        let names = [
            "x-forwarded-for",
            "accept",
            "connection",
            "x-hop",
            "authorization",
            "x-forwarded-host",
            "cookie",
        ];
        for mask in 0u32..(1 << names.len()) {
            for rotate in 0..names.len() {
                let mut h = HeaderMap::new();
                for i in 0..names.len() {
                    let n = names[(i + rotate) % names.len()];
                    if mask & (1 << i) == 0 {
                        continue;
                    }
                    let v = match n {
                        "connection" => "keep-alive, X-Hop",
                        _ => "v1",
                    };
                    h.append(n, HeaderValue::from_static(v));
                    if i % 2 == 0 {
                        h.append(n, HeaderValue::from_static("v2"));
                    }
                }
                rewrite(h.clone(), &forwarding());
                let f = Forwarding {
                    original_host: None,
                    tls: false,
                    ..forwarding()
                };
                rewrite(h, &f);
            }
        }
    }

    #[test]
    fn forwarded_is_reserved() {
        assert!(is_reserved_header(&FORWARDED));
        assert!(is_reserved_header(&header::HOST));
        assert!(!is_reserved_header(&header::AUTHORIZATION));
    }

    #[test]
    fn request_ids_are_kept_when_sane() {
        let mut h = HeaderMap::new();
        h.insert(&X_REQUEST_ID, HeaderValue::from_static("abc-123"));
        assert_eq!(request_id(&h), "abc-123");
        h.insert(&X_REQUEST_ID, HeaderValue::from_static("has space"));
        let fresh = request_id(&h);
        assert_eq!(fresh.len(), 32);
        h.insert(
            &X_REQUEST_ID,
            HeaderValue::from_str(&"a".repeat(200)).unwrap(),
        );
        assert_eq!(request_id(&h).len(), 32);
        assert_ne!(request_id(&HeaderMap::new()), request_id(&HeaderMap::new()));
    }

    #[test]
    fn generated_request_ids_are_distinct_across_batches() {
        let ids: Vec<HeaderValue> = (0..3 * ID_BATCH + 5).map(|_| new_request_id()).collect();
        let distinct: std::collections::HashSet<&[u8]> = ids.iter().map(|v| v.as_bytes()).collect();
        assert_eq!(distinct.len(), ids.len());
        assert!(ids
            .iter()
            .all(|v| v.len() == ID_LEN && v.as_bytes().iter().all(u8::is_ascii_hexdigit)));
    }
}
