//! Value syntaxes several tables share: durations (`"30s"`), sizes
//! (`"64MiB"`), listener addresses (`ip:port`) and http(s) URLs. Each says
//! in its error what it expects; none knows which key it is reading (the
//! caller names it).

use http::Uri;

/// An absolute `http`/`https` URL with a host and no userinfo.
pub(super) fn parse_url(s: &str) -> Result<Uri, String> {
    // Checked first, so that no error below echoes a password.
    if s.split(['/', '?', '#'])
        .nth(2)
        .is_some_and(|authority| authority.contains('@'))
    {
        return Err("credentials in the URL are not supported (use a credential table)".into());
    }
    let uri: Uri = s.parse().map_err(|e| format!("{s:?} is not a URL: {e}"))?;
    match uri.scheme_str() {
        Some("http") | Some("https") => {}
        Some(other) => return Err(format!("{s:?}: scheme {other:?} is not http or https")),
        None => return Err(format!("{s:?} is not an absolute http(s) URL")),
    }
    match uri.authority() {
        Some(a) if !a.host().is_empty() => {}
        _ => return Err(format!("{s:?} has no host")),
    }

    Ok(uri)
}

/// `localhost`, `127.0.0.0/8` and `[::1]` (brackets optional).
pub fn is_loopback_host(host: &str) -> bool {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    bare.eq_ignore_ascii_case("localhost")
        || bare
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// [`parse_url`], and `https://` unless the host is loopback: a URL the
/// proxy sends secrets or browsers to.
pub(super) fn parse_secure_url(s: &str) -> Result<Uri, String> {
    let uri = parse_url(s)?;
    if uri.scheme_str() != Some("https") && !is_loopback_host(uri.host().unwrap_or_default()) {
        return Err("must be https:// (http:// only on loopback)".into());
    }
    Ok(uri)
}

/// Durations in the config: strings like `"30s"`; anything else says what
/// is expected.
pub(super) mod duration {
    use std::fmt;
    use std::time::Duration;

    use serde::de::{self, Deserializer, Visitor};

    const EXPECTED: &str = r#"a duration like "30s", "250ms", "5m""#;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Duration;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(EXPECTED)
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Duration, E> {
                humantime::parse_duration(v)
                    .map_err(|_| E::custom(format!("{v:?} is not a duration: expected {EXPECTED}")))
            }
        }
        d.deserialize_any(V)
    }
}

/// Listener addresses: `ip:port`, never a host name (nothing is resolved).
pub(super) mod socket_addr {
    use std::fmt;
    use std::net::SocketAddr;

    use serde::de::{self, Deserializer, Visitor};

    const EXPECTED: &str =
        r#"an ip:port like "127.0.0.1:8080" or "[::]:8080" (host names are not resolved)"#;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = SocketAddr;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(EXPECTED)
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<SocketAddr, E> {
                v.parse()
                    .map_err(|_| E::custom(format!("{v:?} is not an address: expected {EXPECTED}")))
            }
        }
        d.deserialize_any(V)
    }

    /// The same for an optional key.
    pub mod option {
        use std::net::SocketAddr;

        use serde::de::Deserializer;

        pub fn deserialize<'de, D: Deserializer<'de>>(
            d: D,
        ) -> Result<Option<SocketAddr>, D::Error> {
            super::deserialize(d).map(Some)
        }
    }
}

/// A size as a config would say it: `"64MiB"`, `"512KiB"`, `"1000B"`.
pub fn format_size(bytes: usize) -> String {
    byte_size::format(bytes)
}

/// Sizes in bytes: a number, or a string with a binary unit (`"64MiB"`).
pub(super) mod byte_size {
    use std::fmt;

    use serde::de::{self, Deserializer, Visitor};

    const EXPECTED: &str = r#"a size like "64MiB", "512KiB", "1GiB" or a number of bytes"#;

    /// Parses `"64MiB"`, `"512 KiB"`, `"100B"`, `"100"`.
    pub fn parse(s: &str) -> Option<usize> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let n: usize = num.parse().ok()?;
        let mult: usize = match unit.trim() {
            "" | "B" => 1,
            "KiB" => 1 << 10,
            "MiB" => 1 << 20,
            "GiB" => 1 << 30,
            _ => return None,
        };
        n.checked_mul(mult)
    }

    /// The way a user writes `n`: the largest binary unit that divides it
    /// (`"64MiB"`), else bytes (`"1000B"`); `parse` reads it back.
    pub fn format(n: usize) -> String {
        const UNITS: [(usize, &str); 3] = [(1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")];
        match UNITS.iter().find(|(size, _)| n != 0 && n % size == 0) {
            Some((size, unit)) => format!("{}{unit}", n / size),
            None => format!("{n}B"),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = usize;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(EXPECTED)
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<usize, E> {
                usize::try_from(v)
                    .map_err(|_| E::custom(format!("{v} is not a size: expected {EXPECTED}")))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<usize, E> {
                usize::try_from(v)
                    .map_err(|_| E::custom(format!("{v} is too large: expected {EXPECTED}")))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<usize, E> {
                parse(v)
                    .ok_or_else(|| E::custom(format!("{v:?} is not a size: expected {EXPECTED}")))
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::{parse, GOOD};

    #[test]
    fn bad_durations_say_what_is_expected() {
        for (bad, shown) in [
            ("\"30x\"", "\"30x\""),
            ("\"30\"", "\"30\""),
            ("30", "integer"),
        ] {
            let text = format!("[server]\nidle_timeout = {bad}\n{GOOD}");
            let e = parse(&text).unwrap_err().to_string();
            assert!(e.contains("server.idle_timeout"), "{bad}: {e}");
            assert!(
                e.contains(r#"expected a duration like "30s", "250ms", "5m""#),
                "{bad}: {e}"
            );
            assert!(e.contains(shown), "{bad}: {e}");
        }
        let text = GOOD.replace(
            "client_id = \"id\"",
            "client_id = \"id\"\ntoken_timeout = 5",
        );
        let e = parse(&text).unwrap_err().to_string();
        assert!(e.contains("credentials.flinks.token_timeout"), "{e}");
        assert!(e.contains("expected a duration like"), "{e}");
    }

    #[test]
    fn a_host_name_as_listen_address_names_the_key_and_asks_for_ip_port() {
        let text = format!("[server]\nlisten = \"localhost:8080\"\n{GOOD}");
        let e = parse(&text).unwrap_err().to_string();
        assert!(e.contains("server.listen"), "{e}");
        assert!(e.contains("\"localhost:8080\""), "{e}");
        assert!(e.contains("expected an ip:port"), "{e}");
        let text = format!("[admin]\nlisten = \"localhost:9901\"\n{GOOD}");
        let e = parse(&text).unwrap_err().to_string();
        assert!(e.contains("admin.listen"), "{e}");
        assert!(e.contains("expected an ip:port"), "{e}");
    }

    #[test]
    fn sizes_are_printed_as_written_and_read_back() {
        for (n, text) in [
            (64 << 20, "64MiB"),
            (512 << 10, "512KiB"),
            (1 << 30, "1GiB"),
            (3 << 30, "3GiB"),
            (1536 << 10, "1536KiB"),
            (1000, "1000B"),
            (0, "0B"),
        ] {
            assert_eq!(format_size(n), text);
            assert_eq!(byte_size::parse(text), Some(n), "{text}");
        }
    }
}
