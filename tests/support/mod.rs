//! Test support: real servers on loopback (among them resource servers
//! that verify JWTs and DPoP proofs), a plain HTTP client, a test PKI, and
//! a way to run the real binary as a child process.
//!
//! Every test file includes this with `mod support;` and uses what it needs;
//! each file below holds one concern, re-exported here so call sites stay
//! short.
#![allow(dead_code)]

pub mod browser;
pub mod chaos;
pub mod client;
pub mod config;
pub mod connections;
pub mod dpop;
pub mod durability;
pub mod in_process;
pub mod jwks;
pub mod keys;
pub mod oidc;
pub mod pki;
pub mod postgres;
pub mod process;
pub mod prometheus;
pub mod receiver;
pub mod tempdir;
pub mod upstream;
pub mod webdriver;

// Re-exports: a test binary uses some of them, never all.
#[allow(unused_imports)]
pub use self::client::*;
#[allow(unused_imports)]
pub use self::config::*;
#[allow(unused_imports)]
pub use self::in_process::*;
#[allow(unused_imports)]
pub use self::pki::*;
#[allow(unused_imports)]
pub use self::process::*;
#[allow(unused_imports)]
pub use self::tempdir::*;
#[allow(unused_imports)]
pub use self::upstream::*;

/// A free loopback port below the kernel's ephemeral range (32768 up on
/// Linux), for a listener whose address must be known before it starts (a
/// PostgreSQL cluster restarted on the same port; `[connect]`, whose
/// `public_url` names its port): an ephemeral port could be handed to
/// another socket meanwhile (a `bind(0)` anywhere on the machine).
pub fn free_port() -> u16 {
    for _ in 0..1000 {
        let port = 20_000 + (rand::random::<u16>() % 12_000);
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port in 20000-31999")
}
