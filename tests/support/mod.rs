//! Test support: real servers on loopback, a plain HTTP client, a test PKI,
//! and a way to run the real binary as a child process.
//!
//! Every test file includes this with `mod support;` and uses what it needs;
//! each file below holds one concern, re-exported here so call sites stay
//! short.
#![allow(dead_code)]

pub mod chaos;
pub mod client;
pub mod config;
pub mod connections;
pub mod durability;
pub mod in_process;
pub mod pki;
pub mod postgres;
pub mod process;
pub mod prometheus;
pub mod tempdir;
pub mod upstream;

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
