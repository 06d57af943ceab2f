//! The parser against well-formed, malformed and mutated upstream
//! responses, fed whole and in random pieces.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::*;

/// What a driver makes of `input` fed in pieces of the given sizes (the
/// last piece is whatever is left): status, body, trailers, keep-alive.
#[derive(Debug, PartialEq, Eq)]
struct Outcome {
    status: u16,
    body: Vec<u8>,
    trailers: Option<HeaderMap>,
    keep_alive: bool,
    /// Bytes after the body (read or not).
    left: usize,
}

fn drive(input: &[u8], pieces: &[usize], method: &Method) -> Result<Outcome, WireError> {
    let mut fed = 0;
    let mut next = pieces.iter();
    let mut buf = BytesMut::new();
    let mut feed = |buf: &mut BytesMut| -> bool {
        let n = next
            .next()
            .copied()
            .unwrap_or(usize::MAX)
            .min(input.len() - fed);
        buf.extend_from_slice(&input[fed..fed + n]);
        fed += n;
        fed == input.len()
    };
    let mut eof = feed(&mut buf);
    let head = loop {
        match parse_head(&mut buf, method, &mut Vec::new())? {
            Parsed::Final(head) => break head,
            Parsed::Interim => continue,
            Parsed::Partial if eof => return Err(WireError::Incomplete),
            Parsed::Partial => eof = feed(&mut buf),
        }
    };
    let mut decoder = Decoder::new(head.framing);
    let mut body = Vec::new();
    let mut trailers = None;
    loop {
        match decoder.decode(&mut buf, eof)? {
            Decoded::Data(d) => {
                assert!(!d.is_empty(), "empty data frame");
                body.extend_from_slice(&d);
            }
            Decoded::Trailers(t) => trailers = Some(t),
            Decoded::End => break,
            Decoded::NeedMore => {
                assert!(!eof, "NeedMore at end of input");
                eof = feed(&mut buf);
            }
        }
    }
    assert!(decoder.is_done());
    Ok(Outcome {
        status: head.status.as_u16(),
        body,
        trailers,
        keep_alive: head.keep_alive,
        left: buf.len() + input.len() - fed,
    })
}

fn whole(input: &[u8]) -> Result<Outcome, WireError> {
    drive(input, &[], &Method::GET)
}

const CL: &[u8] = b"HTTP/1.1 200 OK\r\nServer: nginx\r\nContent-Type: text/plain\r\nContent-Length: 13\r\nConnection: keep-alive\r\n\r\nhello, world\n";
const CHUNKED: &[u8] = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n8\r\n, world\n\r\n0\r\nx-checksum: abc\r\n\r\n";

#[test]
fn content_length_body_and_keep_alive() {
    let o = whole(CL).unwrap();
    assert_eq!(o.status, 200);
    assert_eq!(o.body, b"hello, world\n");
    assert!(o.keep_alive);
    assert_eq!(o.left, 0);
}

#[test]
fn hop_by_hop_headers_are_read_but_not_passed_on() {
    let input = b"HTTP/1.1 200 OK\r\nConnection: close, X-Hop\r\nX-Hop: 1\r\nKeep-Alive: timeout=5\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\nUpgrade: h2c\r\nX-Keep: 1\r\nconnection: X-Second\r\nx-second: 2\r\n\r\n0\r\n\r\n";
    let mut buf = BytesMut::from(&input[..]);
    let Parsed::Final(head) = parse_head(&mut buf, &Method::GET, &mut Vec::new()).unwrap() else {
        panic!("not final");
    };
    let names: Vec<&str> = head.headers.keys().map(|n| n.as_str()).collect();
    assert_eq!(names, ["x-keep"]);
    assert_eq!(head.framing, Framing::Chunked);
    assert!(!head.keep_alive);
    let mut buf = BytesMut::from(
        &b"HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\nContent-Length: 0\r\n\r\n"[..],
    );
    let Parsed::Final(head) = parse_head(&mut buf, &Method::GET, &mut Vec::new()).unwrap() else {
        panic!("not final");
    };
    assert!(head.keep_alive);
    assert_eq!(head.headers.len(), 1, "{:?}", head.headers);
}

#[test]
fn head_values_share_the_buffer_and_keep_order() {
    let mut buf = BytesMut::from(CL);
    let Parsed::Final(head) = parse_head(&mut buf, &Method::GET, &mut Vec::new()).unwrap() else {
        panic!("not final");
    };
    assert_eq!(buf.as_ref(), b"hello, world\n");
    assert_eq!(head.headers.get("server").unwrap(), "nginx");
    assert_eq!(head.headers.get("content-type").unwrap(), "text/plain");
    assert_eq!(head.framing, Framing::Length(13));
    assert_eq!(head.version, Version::HTTP_11);
}

#[test]
fn chunked_body_with_extensions_and_trailers() {
    let o = whole(CHUNKED).unwrap();
    assert_eq!(o.body, b"hello, world\n");
    assert_eq!(o.trailers.unwrap().get("x-checksum").unwrap(), "abc");
    assert!(o.keep_alive);
    let plain = b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n";
    let o = whole(plain).unwrap();
    assert_eq!(o.body, b"abc");
    assert_eq!(o.trailers, None);
}

#[test]
fn no_body_for_head_204_304() {
    let o = drive(CL, &[], &Method::HEAD).unwrap();
    assert!(o.body.is_empty());
    assert_eq!(
        o.left, 13,
        "HEAD's Content-Length describes a body not sent"
    );
    for status in ["204 No Content", "304 Not Modified"] {
        let r = format!("HTTP/1.1 {status}\r\nContent-Length: 5\r\n\r\n");
        let o = whole(r.as_bytes()).unwrap();
        assert!(o.body.is_empty(), "{status}");
        assert!(o.keep_alive, "{status}");
    }
}

#[test]
fn interim_responses_are_skipped_and_101_refused() {
    let r = [
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n".as_slice(),
        CL,
    ]
    .concat();
    let o = whole(&r).unwrap();
    assert_eq!(
        (o.status, o.body.as_slice()),
        (200, b"hello, world\n".as_slice())
    );
    let r = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n";
    assert!(matches!(whole(r), Err(WireError::Head(_))));
}

#[test]
fn close_delimited_bodies_end_at_eof_and_are_not_reused() {
    let o = whole(b"HTTP/1.1 200 OK\r\n\r\nuntil the end").unwrap();
    assert_eq!(o.body, b"until the end");
    assert!(!o.keep_alive);
    let o = whole(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nzz").unwrap();
    assert_eq!(o.body, b"zz");
    assert!(!o.keep_alive);
}

#[test]
fn connection_close_and_http_1_0() {
    let o = whole(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n").unwrap();
    assert!(!o.keep_alive);
    let o = whole(b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n").unwrap();
    assert!(!o.keep_alive);
    let o =
        whole(b"HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\nContent-Length: 0\r\n\r\n").unwrap();
    assert!(o.keep_alive);
}

#[test]
fn ambiguous_framing_is_refused() {
    let cases: &[&[u8]] = &[
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
        b"HTTP/1.1 200 OK\r\nContent-Length: 3, 4\r\n\r\nabcd",
        b"HTTP/1.1 200 OK\r\nContent-Length: +3\r\n\r\nabc",
        b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 3a\r\n\r\nabc",
        b"HTTP/1.1 200 OK\r\nContent-Length: \r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: ,\r\n\r\n",
    ];
    for c in cases {
        assert!(
            matches!(whole(c), Err(WireError::Framing(_))),
            "{:?}: {:?}",
            String::from_utf8_lossy(c),
            whole(c)
        );
    }
    // The same length twice is one length.
    let o = whole(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc").unwrap();
    assert_eq!(o.body, b"abc");
}

#[test]
fn malformed_heads_are_refused() {
    let cases: &[&[u8]] = &[
        b"HTTP/1.1 200 OK\r\nX-Folded: a\r\n b\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/2.0 200 OK\r\n\r\n",
        b"HTTP/1.1 2000 OK\r\n\r\n",
        b"HTTP/1.1 099 Low\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nBad Name: x\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX: a\0b\r\n\r\n",
        b"SSH-2.0-OpenSSH\r\n\r\n",
    ];
    for c in cases {
        assert!(
            matches!(whole(c), Err(WireError::Head(_))),
            "{:?}: {:?}",
            String::from_utf8_lossy(c),
            whole(c)
        );
    }
    let mut big = b"HTTP/1.1 200 OK\r\n".to_vec();
    big.extend(
        std::iter::repeat_n(
            b"X-Filler: 0123456789012345678901234567890123456789\r\n".as_slice(),
            99,
        )
        .flatten(),
    );
    big.extend_from_slice(b"X-Last: 1\r\nX-Too-Many: 1\r\n\r\n");
    assert_eq!(whole(&big), Err(WireError::HeadTooLarge));
    let mut long = b"HTTP/1.1 200 OK\r\nX-Long: ".to_vec();
    long.resize(MAX_HEAD + 10, b'a');
    assert_eq!(whole(&long), Err(WireError::HeadTooLarge));
}

#[test]
fn malformed_chunks_are_refused() {
    let head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".as_slice();
    let cases: &[&[u8]] = &[
        b"5\nhello\r\n0\r\n\r\n",
        b"5\r\nhelloX\r\n0\r\n\r\n",
        b"x\r\nhello\r\n0\r\n\r\n",
        b"\r\n",
        b"5 5\r\nhello\r\n0\r\n\r\n",
        b"10000000000000000\r\n",
        b"5;a\x01b\r\nhello\r\n0\r\n\r\n",
        b"0\r\nno colon\r\n\r\n",
    ];
    for c in cases {
        let r = [head, c].concat();
        assert!(
            matches!(whole(&r), Err(WireError::Chunk(_))),
            "{:?}: {:?}",
            String::from_utf8_lossy(c),
            whole(&r)
        );
    }
}

#[test]
fn only_spaces_and_tabs_may_precede_a_chunk_extension() {
    // RFC 9112 §7.1.1: BWS (SP / HTAB) before `;`, nothing else.
    for bad in [
        b"5\r".as_slice(),
        b"5\x0c",
        b"5\x0b",
        b"5\x0c;ext",
        b"5\r;ext",
    ] {
        assert_eq!(
            chunk_size(bad),
            Err(WireError::Chunk("invalid chunk size")),
            "{:?}",
            String::from_utf8_lossy(bad)
        );
    }
    for good in [b"5 ;ext".as_slice(), b"5\t;x", b"5 \t ;a=b", b"5;ext", b"5"] {
        assert_eq!(
            chunk_size(good),
            Ok(5),
            "{:?}",
            String::from_utf8_lossy(good)
        );
    }
    // And on the wire: `5\r\r\n` is refused, `5 ;ext\r\n` read.
    let head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".as_slice();
    let r = [head, b"5\r\r\nhello\r\n0\r\n\r\n"].concat();
    assert!(
        matches!(whole(&r), Err(WireError::Chunk(_))),
        "{:?}",
        whole(&r)
    );
    let r = [head, b"5 ;ext\r\nhello\r\n0\r\n\r\n"].concat();
    assert_eq!(whole(&r).map(|o| o.body), Ok(b"hello".to_vec()));
}

#[test]
fn truncated_responses_are_incomplete() {
    assert_eq!(whole(&CL[..CL.len() - 1]), Err(WireError::Incomplete));
    assert_eq!(
        whole(&CHUNKED[..CHUNKED.len() - 1]),
        Err(WireError::Incomplete)
    );
    assert_eq!(whole(&CL[..20]), Err(WireError::Incomplete));
    let head_only = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel";
    assert_eq!(whole(head_only), Err(WireError::Incomplete));
}

#[test]
fn bytes_after_the_body_are_left_in_the_buffer() {
    let r = [CL, b"HTTP/1.1 200 OK\r\n".as_slice()].concat();
    assert_eq!(whole(&r).unwrap().left, 17);
}

#[test]
fn request_heads_carry_the_body_framing() {
    let mut headers = HeaderMap::new();
    headers.insert(header::HOST, HeaderValue::from_static("up:80"));
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("999"));
    headers.insert(
        header::TRANSFER_ENCODING,
        HeaderValue::from_static("chunked"),
    );
    headers.append("x-a", HeaderValue::from_static("1"));
    headers.append("x-a", HeaderValue::from_static("2"));
    let mut out = BytesMut::new();
    encode_head(&mut out, &Method::POST, "/p?q=1", &headers, Some(12));
    assert_eq!(
        out.as_ref(),
        b"POST /p?q=1 HTTP/1.1\r\nhost: up:80\r\nx-a: 1\r\nx-a: 2\r\ncontent-length: 12\r\n\r\n"
    );
    out.clear();
    encode_head(&mut out, &Method::GET, "/", &HeaderMap::new(), Some(0));
    assert_eq!(out.as_ref(), b"GET / HTTP/1.1\r\n\r\n");
    out.clear();
    encode_head(&mut out, &Method::PUT, "/", &HeaderMap::new(), Some(0));
    assert_eq!(out.as_ref(), b"PUT / HTTP/1.1\r\ncontent-length: 0\r\n\r\n");
    out.clear();
    encode_head(&mut out, &Method::POST, "/", &HeaderMap::new(), None);
    assert_eq!(
        out.as_ref(),
        b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n"
    );
    out.clear();
    encode_chunk(&mut out, &[b'x'; 300]);
    out.extend_from_slice(LAST_CHUNK);
    assert!(out.starts_with(b"12c\r\nxxx"));
    assert!(out.ends_with(b"xx\r\n0\r\n\r\n"));
}

fn random_pieces(rng: &mut StdRng, len: usize) -> Vec<usize> {
    let mut pieces = Vec::new();
    let mut total = 0;
    while total < len {
        let n = rng.gen_range(1..=8.min(len - total).max(1));
        pieces.push(n);
        total += n;
    }
    pieces
}

/// Every valid response decodes the same whole and in random pieces.
#[test]
fn split_reads_do_not_change_the_outcome() {
    let mut rng = StdRng::seed_from_u64(11);
    let samples: Vec<Vec<u8>> = vec![
        CL.to_vec(),
        CHUNKED.to_vec(),
        [b"HTTP/1.1 100 Continue\r\n\r\n".as_slice(), CL].concat(),
        b"HTTP/1.1 200 OK\r\n\r\nuntil the end".to_vec(),
        b"HTTP/1.1 204 No Content\r\n\r\n".to_vec(),
    ];
    for s in &samples {
        let expected = whole(s).unwrap();
        for _ in 0..200 {
            let pieces = random_pieces(&mut rng, s.len());
            assert_eq!(drive(s, &pieces, &Method::GET).as_ref(), Ok(&expected));
        }
    }
}

/// Mutations of valid responses (bytes flipped, inserted, deleted,
/// truncated, framing digits changed): never a panic, never more body than
/// was sent, the same outcome whole and in pieces.
#[test]
fn mutated_responses_never_confuse_the_parser() {
    let mut rng = StdRng::seed_from_u64(0x5eed);
    let seeds = [
        CL,
        CHUNKED,
        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n".as_slice(),
    ];
    let alphabet = b"\r\n:;, 0123456789abcdefABCDEF\t\x00\x7fHTTP/1.chunkedContent-Length";
    let mut ok = 0;
    for i in 0..20_000 {
        let mut input = seeds[i % seeds.len()].to_vec();
        for _ in 0..rng.gen_range(1..4) {
            if input.is_empty() {
                break;
            }
            let at = rng.gen_range(0..input.len());
            match rng.gen_range(0..5) {
                0 => input[at] = alphabet[rng.gen_range(0..alphabet.len())],
                1 => input.insert(at, alphabet[rng.gen_range(0..alphabet.len())]),
                2 => {
                    input.remove(at);
                }
                3 => input.truncate(at),
                _ => input[at] = rng.gen(),
            }
        }
        let all = whole(&input);
        let pieces = random_pieces(&mut rng, input.len());
        assert_eq!(
            drive(&input, &pieces, &Method::GET),
            all,
            "{:?}",
            String::from_utf8_lossy(&input)
        );
        if let Ok(o) = all {
            ok += 1;
            assert!(o.body.len() + o.left < input.len());
            assert!((100..1000).contains(&o.status));
        }
    }
    // The mutations are small: a good share still parses.
    assert!(ok > 1_000, "only {ok} parsed");
}

#[test]
fn common_names_are_recognised_in_any_case_and_others_are_left_to_http() {
    for (raw, want) in [
        (&b"Content-Length"[..], header::CONTENT_LENGTH),
        (b"content-type", header::CONTENT_TYPE),
        (b"DATE", header::DATE),
        (b"Server", header::SERVER),
        (b"cOnNeCtIoN", header::CONNECTION),
        (b"Transfer-Encoding", header::TRANSFER_ENCODING),
        (b"Last-Modified", header::LAST_MODIFIED),
    ] {
        assert_eq!(
            common_name(raw),
            Some(want),
            "{}",
            String::from_utf8_lossy(raw)
        );
    }
    for raw in [
        &b"Content-Lengtx"[..],
        b"x-date",
        b"Dat",
        b"",
        b"X-Request-Id",
        b"Content_Length",
        b"Content-Lengt\x0e",
        b"Dote",
    ] {
        assert_eq!(common_name(raw), None, "{}", String::from_utf8_lossy(raw));
    }
    // The names compared are lower-case letters and `-` only (what makes
    // the 0x20 comparison exact).
    for name in [
        header::DATE,
        header::VARY,
        header::ETAG,
        header::SERVER,
        header::CONNECTION,
        header::SET_COOKIE,
        header::CONTENT_TYPE,
        header::CACHE_CONTROL,
        header::LAST_MODIFIED,
        header::CONTENT_LENGTH,
        header::CONTENT_ENCODING,
        header::TRANSFER_ENCODING,
    ] {
        let s = name.as_str();
        assert!(
            s.bytes().all(|b| b.is_ascii_lowercase() || b == b'-'),
            "{s}"
        );
        assert_eq!(
            common_name(s.to_ascii_uppercase().as_bytes()),
            Some(name.clone())
        );
        assert_eq!(common_name(s.as_bytes()), Some(name));
    }
}

#[test]
fn every_token_byte_compares_exactly_under_the_case_mask() {
    // httparse's token bytes: what a header name may hold.
    let token = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    for want in (b'a'..=b'z').chain([b'-']) {
        for b in 0u8..=255 {
            if token(b) {
                assert_eq!(
                    eq_token_lower(&[b], &[want]),
                    b.eq_ignore_ascii_case(&want),
                    "{b:#x} against {}",
                    want as char
                );
            }
        }
    }
}
