//! Transport that knows no tokens: request and response bodies (idle
//! timers, the replay buffer), header policy ([`headers`]: hop-by-hop,
//! reserved names, X-Forwarded-*, request ids), TLS loading ([`tls`]) and
//! the connection pools per upstream origin with the HTTP/1.1 wire and
//! HTTP/2 ([`upstream`]), also used as the token endpoints' client.
//!
//! Imports only [`crate::ground`]; must not import config, tokens,
//! connections, the store or the proxy.

pub mod body;
pub mod headers;
pub mod tls;
pub mod upstream;
