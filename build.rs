//! The migrations are embedded at compile time (`sqlx::migrate!`), and
//! Cargo does not see the directory the macro reads: without this line a
//! migration added or edited is left out of the binary until some Rust
//! source changes.

fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
