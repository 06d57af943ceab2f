//! HTTP/1.1 on the wire towards an upstream, without I/O: the request head
//! the proxy writes, and strict parsing of what comes back — the response
//! head (httparse) and its body framing (RFC 9112 §6.3: no body for HEAD,
//! 1xx, 204 and 304; `Transfer-Encoding: chunked`; `Content-Length`; else
//! until the connection closes).
//!
//! Anything ambiguous is refused rather than guessed at: `Content-Length`
//! together with `Transfer-Encoding`, differing or malformed lengths, a
//! transfer coding other than a final `chunked`, obsolete line folding, bare
//! LF in chunk framing, chunk sizes that overflow. The connection driver
//! (reads, writes, the pool) lives in the parent module; this one only
//! turns bytes into heads and frames.

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderName};
use http::{HeaderMap, HeaderValue, Method, StatusCode, Version};

use super::{Head as RequestHead, Rewrite};
use crate::net::headers;

/// Longest response head accepted (status line and headers).
pub(crate) const MAX_HEAD: usize = 64 * 1024;
/// Most headers in a response head (and in a trailer section).
pub(crate) const MAX_HEADERS: usize = 100;
/// Longest chunk-size line (size and extensions).
const MAX_CHUNK_LINE: usize = 4 * 1024;
/// Longest trailer section.
const MAX_TRAILERS: usize = 16 * 1024;

/// What is wrong with an upstream's response.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum WireError {
    /// The head is not valid HTTP/1.x.
    #[error("malformed response head: {0}")]
    Head(&'static str),
    /// The head is longer than [`MAX_HEAD`] or has more than
    /// [`MAX_HEADERS`] headers.
    #[error("response head too large")]
    HeadTooLarge,
    /// The body's framing headers are ambiguous or invalid.
    #[error("invalid response framing: {0}")]
    Framing(&'static str),
    /// The chunked body is malformed.
    #[error("malformed chunked body: {0}")]
    Chunk(&'static str),
    /// The connection closed before the response was complete.
    #[error("connection closed before the response was complete")]
    Incomplete,
}

/// How the response body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Framing {
    /// No body at all.
    Empty,
    /// Exactly this many bytes.
    Length(u64),
    /// Chunked transfer coding.
    Chunked,
    /// Until the upstream closes the connection.
    Close,
}

/// A parsed final response head.
#[derive(Debug)]
pub(crate) struct Head {
    pub(crate) status: StatusCode,
    pub(crate) version: Version,
    pub(crate) headers: HeaderMap,
    pub(crate) framing: Framing,
    /// The connection may carry another request once the body has ended.
    pub(crate) keep_alive: bool,
}

/// The outcome of parsing the start of the read buffer.
#[derive(Debug)]
pub(crate) enum Parsed {
    /// More bytes are needed.
    Partial,
    /// An interim (1xx) response, consumed.
    Interim,
    /// A final response head, consumed.
    Final(Head),
}

/// Where a header's name and value sit in the head: offsets and lengths.
pub(crate) type Span = (usize, usize, usize, usize);

/// Parses a response head at the start of `buf` for a request with
/// `method`. The head's header values share `buf`'s memory (`buf` is split
/// at the end of the head); nothing is consumed when the head is partial.
/// `spans` is scratch space, kept by the caller across responses.
pub(crate) fn parse_head(
    buf: &mut BytesMut,
    method: &Method,
    spans: &mut Vec<Span>,
) -> Result<Parsed, WireError> {
    let mut slots =
        [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut []);
    let parsed = httparse::ParserConfig::default()
        .parse_response_with_uninit_headers(&mut resp, buf, &mut slots);
    let len = match parsed {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => {
            return Err(WireError::HeadTooLarge)
        }
        Ok(httparse::Status::Partial) => return Ok(Parsed::Partial),
        Err(httparse::Error::TooManyHeaders) => return Err(WireError::HeadTooLarge),
        Err(e) => return Err(WireError::Head(parse_error(e))),
    };
    if len > MAX_HEAD {
        return Err(WireError::HeadTooLarge);
    }
    let code = resp.code.unwrap_or(0);
    let status = StatusCode::from_u16(code).map_err(|_| WireError::Head("invalid status code"))?;
    let version = match resp.version {
        Some(1) => Version::HTTP_11,
        _ => Version::HTTP_10,
    };
    if status.is_informational() {
        // 101 would switch protocols; the proxy never asks for an upgrade.
        if status == StatusCode::SWITCHING_PROTOCOLS {
            return Err(WireError::Head("unexpected 101 Switching Protocols"));
        }
        buf.advance(len);
        return Ok(Parsed::Interim);
    }
    // Header positions, so the values can share the frozen head's memory.
    let base = buf.as_ptr() as usize;
    spans.clear();
    spans.extend(resp.headers.iter().map(|h| {
        let name = h.name.as_ptr() as usize - base;
        let value = h.value.as_ptr() as usize - base;
        (name, h.name.len(), value, h.value.len())
    }));
    let head = buf.split_to(len).freeze();
    let mut headers = HeaderMap::with_capacity(spans.len());
    let mut present = Present::default();
    // What each header is: hop-by-hop ones are read for framing and
    // keep-alive but do not go into the map (the client's response never
    // carries them), which saves their insertion and later removal.
    let mut kinds = [Kind::Other; MAX_HEADERS];
    for (&(n, nl, v, vl), kind) in spans.iter().zip(kinds.iter_mut()) {
        let raw = &head[n..n + nl];
        let name = match common_name(raw) {
            Some(name) => name,
            None => {
                HeaderName::from_bytes(raw).map_err(|_| WireError::Head("invalid header name"))?
            }
        };
        let value = HeaderValue::from_maybe_shared(head.slice(v..v + vl))
            .map_err(|_| WireError::Head("invalid header value"))?;
        *kind = present.note(&name);
        if matches!(*kind, Kind::Other | Kind::ContentLength) {
            headers.append(name, value);
        }
    }
    let head = &head;
    let kinds = &kinds;
    let values = |want: Kind| {
        spans
            .iter()
            .zip(kinds.iter())
            .filter(move |&(_, kind)| *kind == want)
            .map(move |(&(_, _, v, vl), _)| &head[v..v + vl])
    };
    let framing = framing(
        values(Kind::ContentLength),
        values(Kind::TransferEncoding),
        present,
        status,
        method,
    )?;
    let keep_alive =
        keep_alive(values(Kind::Connection), present, version) && framing != Framing::Close;
    if present.connection {
        remove_listed(&mut headers, values(Kind::Connection));
    }
    Ok(Parsed::Final(Head {
        status,
        version,
        headers,
        framing,
        keep_alive,
    }))
}

/// The names most responses carry, recognised in any case without
/// [`HeaderName::from_bytes`]' copy into a lower-case buffer and table
/// lookup (about 120 instructions a header); `None` for the rest.
fn common_name(raw: &[u8]) -> Option<HeaderName> {
    let first = raw.first()? | 0x20;
    let name = match (raw.len(), first) {
        (4, b'd') => header::DATE,
        (4, b'v') => header::VARY,
        (4, b'e') => header::ETAG,
        (6, b's') => header::SERVER,
        (10, b'c') => header::CONNECTION,
        (10, b's') => header::SET_COOKIE,
        (12, b'c') => header::CONTENT_TYPE,
        (13, b'c') => header::CACHE_CONTROL,
        (13, b'l') => header::LAST_MODIFIED,
        (14, b'c') => header::CONTENT_LENGTH,
        (16, b'c') => header::CONTENT_ENCODING,
        (17, b't') => header::TRANSFER_ENCODING,
        _ => return None,
    };
    eq_token_lower(raw, name.as_str().as_bytes()).then_some(name)
}

/// Whether the token `raw` (a header name as httparse accepted it) is
/// `lower` (lower-case letters and `-`) in any case. Setting bit 0x20 makes
/// an upper-case letter lower-case and leaves lower-case letters and `-`
/// alone; no other token byte becomes one of those, so the comparison is
/// exact. Eight bytes at a time.
fn eq_token_lower(raw: &[u8], lower: &[u8]) -> bool {
    if raw.len() != lower.len() {
        return false;
    }
    let (mut r, mut l) = (raw, lower);
    let mut diff = 0u64;
    while let (Some((a, ra)), Some((b, lb))) =
        (r.split_first_chunk::<8>(), l.split_first_chunk::<8>())
    {
        diff |= (u64::from_le_bytes(*a) | 0x2020_2020_2020_2020) ^ u64::from_le_bytes(*b);
        (r, l) = (ra, lb);
    }
    for (a, b) in r.iter().zip(l) {
        diff |= u64::from((a | 0x20) ^ b);
    }
    diff == 0
}

fn parse_error(e: httparse::Error) -> &'static str {
    match e {
        httparse::Error::HeaderName => "invalid header name",
        httparse::Error::HeaderValue => "invalid header value",
        httparse::Error::NewLine => "invalid line ending",
        httparse::Error::Status => "invalid status",
        httparse::Error::Token => "invalid token",
        httparse::Error::Version => "invalid version",
        httparse::Error::TooManyHeaders => "too many headers",
    }
}

/// Which framing headers a head has, noted while its map is built so that
/// absent ones cost no hashed lookup.
#[derive(Debug, Default, Clone, Copy)]
struct Present {
    transfer_encoding: bool,
    content_length: bool,
    connection: bool,
}

/// A response header as the parser sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Passed on.
    Other,
    /// `Content-Length`, read for framing and passed on.
    ContentLength,
    /// Hop-by-hop (RFC 9110 §7.6.1), read here and not passed on:
    /// `Connection`,
    Connection,
    /// `Transfer-Encoding`,
    TransferEncoding,
    /// and the rest of the fixed set.
    Hop,
}

impl Present {
    fn note(&mut self, name: &HeaderName) -> Kind {
        self.transfer_encoding |= name == header::TRANSFER_ENCODING;
        self.content_length |= name == header::CONTENT_LENGTH;
        self.connection |= name == header::CONNECTION;
        if name == header::CONNECTION {
            Kind::Connection
        } else if name == header::TRANSFER_ENCODING {
            Kind::TransferEncoding
        } else if name == header::CONTENT_LENGTH {
            Kind::ContentLength
        } else if headers::is_hop_by_hop(name) {
            Kind::Hop
        } else {
            Kind::Other
        }
    }
}

/// Removes the headers a response's `Connection` headers list (hop-by-hop
/// too).
fn remove_listed<'a>(headers: &mut HeaderMap, connection: impl Iterator<Item = &'a [u8]>) {
    for token in connection.flat_map(headers::connection_listed) {
        if let Ok(name) = std::str::from_utf8(token) {
            headers.remove(name);
        }
    }
}

/// RFC 9112 §6.3, strictly.
fn framing<'a>(
    content_lengths: impl Iterator<Item = &'a [u8]>,
    transfer_encoding: impl Iterator<Item = &'a [u8]>,
    present: Present,
    status: StatusCode,
    method: &Method,
) -> Result<Framing, WireError> {
    if method == Method::HEAD
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        return Ok(Framing::Empty);
    }
    let has_length = present.content_length;
    if present.transfer_encoding {
        if has_length {
            return Err(WireError::Framing(
                "both Transfer-Encoding and Content-Length",
            ));
        }
        // Chunked must be the last coding, and only once.
        let mut codings = Vec::<&[u8]>::new();
        for v in transfer_encoding {
            for c in v.split(|&b| b == b',') {
                let c = c.trim_ascii();
                if !c.is_empty() {
                    codings.push(c);
                }
            }
        }
        let chunked = |c: &&[u8]| c.eq_ignore_ascii_case(b"chunked");
        return match codings.iter().position(chunked) {
            Some(i) if i + 1 == codings.len() => Ok(Framing::Chunked),
            Some(_) => Err(WireError::Framing("chunked is not the final coding")),
            // Another coding without chunked: delimited by the close.
            None if !codings.is_empty() => Ok(Framing::Close),
            None => Err(WireError::Framing("empty Transfer-Encoding")),
        };
    }
    if has_length {
        return content_length(content_lengths).map(Framing::Length);
    }
    Ok(Framing::Close)
}

/// The one length all `Content-Length` values agree on.
fn content_length<'a>(values: impl Iterator<Item = &'a [u8]>) -> Result<u64, WireError> {
    let mut length = None;
    for v in values {
        for part in v.split(|&b| b == b',') {
            let n = parse_decimal(part.trim_ascii())
                .ok_or(WireError::Framing("invalid Content-Length"))?;
            match length {
                Some(l) if l != n => return Err(WireError::Framing("differing Content-Length")),
                _ => length = Some(n),
            }
        }
    }
    length.ok_or(WireError::Framing("invalid Content-Length"))
}

fn parse_decimal(s: &[u8]) -> Option<u64> {
    if s.is_empty() || s.len() > 19 {
        return None;
    }
    s.iter().try_fold(0u64, |n, &b| {
        b.is_ascii_digit().then(|| n * 10 + u64::from(b - b'0'))
    })
}

/// HTTP/1.1 unless `Connection: close`; HTTP/1.0 only with `keep-alive`.
fn keep_alive<'a>(
    connection: impl Iterator<Item = &'a [u8]>,
    present: Present,
    version: Version,
) -> bool {
    if !present.connection {
        return version == Version::HTTP_11;
    }
    let mut close = false;
    let mut keep = false;
    for v in connection {
        for token in v.split(|&b| b == b',') {
            let t = token.trim_ascii();
            close |= t.eq_ignore_ascii_case(b"close");
            keep |= t.eq_ignore_ascii_case(b"keep-alive");
        }
    }
    !close && (version == Version::HTTP_11 || keep)
}

/// A body frame decoded from the read buffer.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Decoded {
    /// Body bytes.
    Data(Bytes),
    /// The trailer section of a chunked body (then the end).
    Trailers(HeaderMap),
    /// The body is complete.
    End,
    /// More bytes are needed.
    NeedMore,
}

/// Decodes a body out of the connection's read buffer, frame by frame.
#[derive(Debug)]
pub(crate) struct Decoder {
    state: State,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Bytes left of a `Content-Length` body.
    Length(u64),
    /// Everything until the connection closes.
    Close,
    /// Expecting a chunk-size line.
    ChunkSize,
    /// Bytes left of the current chunk.
    ChunkData(u64),
    /// Expecting the CRLF after a chunk's data.
    ChunkEnd,
    /// Expecting the trailer section (or the final CRLF).
    Trailers,
    /// Done.
    Done,
}

impl Decoder {
    /// A decoder for a body framed as `framing`.
    pub(crate) fn new(framing: Framing) -> Decoder {
        let state = match framing {
            Framing::Empty | Framing::Length(0) => State::Done,
            Framing::Length(n) => State::Length(n),
            Framing::Chunked => State::ChunkSize,
            Framing::Close => State::Close,
        };
        Decoder { state }
    }

    /// Whether the body has ended.
    pub(crate) fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Bytes still expected, when known (the exact remaining length).
    pub(crate) fn remaining(&self) -> Option<u64> {
        match self.state {
            State::Length(n) => Some(n),
            State::Done => Some(0),
            _ => None,
        }
    }

    /// The next frame from `buf`; `eof` says the connection has closed
    /// (no more bytes will come).
    pub(crate) fn decode(&mut self, buf: &mut BytesMut, eof: bool) -> Result<Decoded, WireError> {
        loop {
            // Each step returns a frame, or moves to the next state.
            let step = match self.state {
                State::Done => return Ok(Decoded::End),
                State::Length(n) => self.data(buf, eof, n, State::Length, State::Done),
                State::Close => self.close_data(buf, eof),
                State::ChunkSize => self.chunk_size_line(buf, eof),
                State::ChunkData(n) => self.data(buf, eof, n, State::ChunkData, State::ChunkEnd),
                State::ChunkEnd => self.chunk_end(buf, eof),
                State::Trailers => self.trailers(buf, eof),
            };
            if let Some(frame) = step? {
                return Ok(frame);
            }
        }
    }

    /// Up to `n` bytes of a `Content-Length` body or of a chunk's data;
    /// the state after is `more` of what is left, or `end` when nothing is.
    #[inline]
    fn data(
        &mut self,
        buf: &mut BytesMut,
        eof: bool,
        n: u64,
        more: fn(u64) -> State,
        end: State,
    ) -> Result<Option<Decoded>, WireError> {
        if buf.is_empty() {
            return short(eof);
        }
        let take = take_len(n, buf.len());
        let left = n - take as u64;
        self.state = if left == 0 { end } else { more(left) };
        Ok(Some(Decoded::Data(buf.split_to(take).freeze())))
    }

    /// Whatever is there of a body that ends when the connection closes.
    #[inline]
    fn close_data(&mut self, buf: &mut BytesMut, eof: bool) -> Result<Option<Decoded>, WireError> {
        if !buf.is_empty() {
            return Ok(Some(Decoded::Data(buf.split().freeze())));
        }
        if eof {
            self.state = State::Done;
            return Ok(None);
        }
        Ok(Some(Decoded::NeedMore))
    }

    /// A chunk-size line: the next chunk's data, or the trailers after the
    /// last chunk.
    #[inline]
    fn chunk_size_line(
        &mut self,
        buf: &mut BytesMut,
        eof: bool,
    ) -> Result<Option<Decoded>, WireError> {
        let Some(line) = line(buf, MAX_CHUNK_LINE, eof, "chunk-size line too long")? else {
            return Ok(Some(Decoded::NeedMore));
        };
        let size = chunk_size(&line)?;
        self.state = if size == 0 {
            State::Trailers
        } else {
            State::ChunkData(size)
        };
        Ok(None)
    }

    /// The CRLF after a chunk's data.
    #[inline]
    fn chunk_end(&mut self, buf: &mut BytesMut, eof: bool) -> Result<Option<Decoded>, WireError> {
        if buf.len() < 2 {
            return short(eof);
        }
        if &buf[..2] != b"\r\n" {
            return Err(WireError::Chunk("chunk data not followed by CRLF"));
        }
        buf.advance(2);
        self.state = State::ChunkSize;
        Ok(None)
    }

    /// The trailer section, or the final CRLF when there is none.
    #[inline]
    fn trailers(&mut self, buf: &mut BytesMut, eof: bool) -> Result<Option<Decoded>, WireError> {
        if buf.len() >= 2 && &buf[..2] == b"\r\n" {
            buf.advance(2);
            self.state = State::Done;
            return Ok(None);
        }
        match trailer_section(buf, eof)? {
            Some(t) => {
                self.state = State::Done;
                Ok(Some(Decoded::Trailers(t)))
            }
            None => Ok(Some(Decoded::NeedMore)),
        }
    }
}

/// A buffer too short for the next step: the body ended early when the
/// connection has closed, else more bytes are needed.
#[inline]
fn short(eof: bool) -> Result<Option<Decoded>, WireError> {
    if eof {
        Err(WireError::Incomplete)
    } else {
        Ok(Some(Decoded::NeedMore))
    }
}

fn take_len(wanted: u64, available: usize) -> usize {
    usize::try_from(wanted).map_or(available, |w| w.min(available))
}

/// The line at the start of `buf` (without its CRLF), consumed; `None`
/// while incomplete. Bare LF is an error.
fn line(
    buf: &mut BytesMut,
    max: usize,
    eof: bool,
    too_long: &'static str,
) -> Result<Option<BytesMut>, WireError> {
    match buf.iter().position(|&b| b == b'\n') {
        Some(i) if i > max => Err(WireError::Chunk(too_long)),
        Some(0) => Err(WireError::Chunk("bare LF")),
        Some(i) if buf[i - 1] != b'\r' => Err(WireError::Chunk("bare LF")),
        Some(i) => {
            let mut l = buf.split_to(i + 1);
            l.truncate(i - 1);
            Ok(Some(l))
        }
        None if buf.len() > max => Err(WireError::Chunk(too_long)),
        None if eof => Err(WireError::Incomplete),
        None => Ok(None),
    }
}

/// A chunk-size line: hex digits, then optional extensions after `;`.
fn chunk_size(line: &[u8]) -> Result<u64, WireError> {
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 {
        return Err(WireError::Chunk("missing chunk size"));
    }
    if digits > 15 {
        return Err(WireError::Chunk("chunk size too large"));
    }
    // RFC 9112 §7.1.1: only BWS (spaces, tabs) before an extension's `;`;
    // a CR or form feed there would be read differently by other parsers.
    let ws = line[digits..]
        .iter()
        .take_while(|&&b| b == b' ' || b == b'\t')
        .count();
    let rest = &line[digits + ws..];
    if !rest.is_empty() && rest[0] != b';' {
        return Err(WireError::Chunk("invalid chunk size"));
    }
    if rest
        .iter()
        .any(|&b| b == b'\r' || (b < 0x20 && b != b'\t') || b == 0x7f)
    {
        return Err(WireError::Chunk("invalid chunk extension"));
    }
    let mut n = 0u64;
    for &b in &line[..digits] {
        let d = match b {
            b'0'..=b'9' => b - b'0',
            b'a'..=b'f' => b - b'a' + 10,
            _ => b - b'A' + 10,
        };
        n = n * 16 + u64::from(d);
    }
    Ok(n)
}

/// The trailer section (up to and including its final empty line) once it
/// is all in `buf`.
fn trailer_section(buf: &mut BytesMut, eof: bool) -> Result<Option<HeaderMap>, WireError> {
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n");
    let Some(end) = end else {
        if buf.len() > MAX_TRAILERS {
            return Err(WireError::Chunk("trailer section too large"));
        }
        return if eof {
            Err(WireError::Incomplete)
        } else {
            Ok(None)
        };
    };
    if end + 4 > MAX_TRAILERS {
        return Err(WireError::Chunk("trailer section too large"));
    }
    let section = buf.split_to(end + 4).freeze();
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let parsed = match httparse::parse_headers(&section, &mut slots) {
        Ok(httparse::Status::Complete((_, parsed))) => parsed,
        _ => return Err(WireError::Chunk("malformed trailer section")),
    };
    let mut trailers = HeaderMap::with_capacity(parsed.len());
    for h in parsed.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes())
            .map_err(|_| WireError::Chunk("invalid trailer name"))?;
        let value = HeaderValue::from_maybe_shared(section.slice_ref(h.value))
            .map_err(|_| WireError::Chunk("invalid trailer value"))?;
        trailers.append(name, value);
    }
    Ok(Some(trailers))
}

/// Writes the request head of `head` into `out`: request line in origin
/// form, the rewritten headers (written straight from the client's, see
/// [`headers::write_request`]) or the headers as they are, then the
/// framing of the body the proxy will write (see [`encode_head`]).
pub(crate) fn encode_request(
    out: &mut BytesMut,
    head: &RequestHead,
    rw: &Rewrite<'_>,
    body_len: Option<u64>,
) {
    let pq = head.uri.path_and_query().map_or("/", |p| p.as_str());
    request_line(out, &head.method, pq, head.headers.len());
    match (&rw.forwarding, head.client) {
        (Some(f), true) => headers::write_request(out, &head.headers, f, rw.set, is_framing),
        _ => header_lines(out, &head.headers, rw.set),
    }
    body_framing(out, &head.method, body_len);
}

/// Writes the request head into `out`: request line in origin form,
/// `headers` minus any framing the client sent, then the framing of the
/// body the proxy will write: `content-length` when its length is known
/// (`None` for no body on a method that has none), else chunked.
#[cfg(test)]
pub(crate) fn encode_head(
    out: &mut BytesMut,
    method: &Method,
    path_and_query: &str,
    headers: &HeaderMap,
    body_len: Option<u64>,
) {
    request_line(out, method, path_and_query, headers.len());
    header_lines(out, headers, &[]);
    body_framing(out, method, body_len);
}

fn request_line(out: &mut BytesMut, method: &Method, path_and_query: &str, headers: usize) {
    // The buffer is the connection's and keeps its capacity: after the first
    // request this reserves nothing, and no sizing pass over the headers is
    // needed.
    out.reserve(method.as_str().len() + path_and_query.len() + 40 * headers + 512);
    out.extend_from_slice(method.as_str().as_bytes());
    out.extend_from_slice(b" ");
    out.extend_from_slice(path_and_query.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
}

/// The framing headers, which the proxy writes itself.
fn is_framing(name: &HeaderName) -> bool {
    name == header::CONTENT_LENGTH || name == header::TRANSFER_ENCODING
}

/// `headers` as they are, minus framing and the names of `set`, then `set`.
fn header_lines(
    out: &mut BytesMut,
    headers: &HeaderMap,
    set: &[Option<(HeaderName, HeaderValue)>],
) {
    for (name, value) in headers {
        if is_framing(name) || set.iter().flatten().any(|(n, _)| n == name) {
            continue;
        }
        headers::line(out, name.as_str().as_bytes(), value.as_bytes());
    }
    for (name, value) in set.iter().flatten() {
        headers::line(out, name.as_str().as_bytes(), value.as_bytes());
    }
}

fn body_framing(out: &mut BytesMut, method: &Method, body_len: Option<u64>) {
    match body_len {
        Some(0) if !method_has_body(method) => {}
        Some(n) => {
            out.extend_from_slice(b"content-length: ");
            push_decimal(out, n);
            out.extend_from_slice(b"\r\n");
        }
        None => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
    }
    out.extend_from_slice(b"\r\n");
}

/// Methods whose requests announce an empty body (`content-length: 0`).
fn method_has_body(method: &Method) -> bool {
    method == Method::POST || method == Method::PUT || method == Method::PATCH
}

fn push_decimal(out: &mut BytesMut, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

/// Writes one chunk of a chunked request body.
pub(crate) fn encode_chunk(out: &mut BytesMut, data: &[u8]) {
    out.reserve(data.len() + 20);
    let mut digits = [0u8; 16];
    let mut i = digits.len();
    let mut n = data.len();
    loop {
        i -= 1;
        digits[i] = b"0123456789abcdef"[n % 16];
        n /= 16;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
}

/// The end of a chunked request body.
pub(crate) const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

#[cfg(test)]
mod tests;
