//! `flinks-proxy bench-rows` (hidden): connection rows for the sandbox's
//! stateless bench users (`sandbox --bench-users N`), sealed under a store
//! key exactly as the store seals them, written as PostgreSQL `COPY` text
//! to stdout, so `benches/scale.sh` seeds a million connections with one
//! `\copy` instead of a million code exchanges.
//!
//! Columns, in order: `pool, id, sub, state, created_at, authorized_at,
//! last_refresh_at, access_token_expires_at, refresh_token, access_token`
//! (the rest keep their defaults). Every row is `active` with the user's
//! refresh token; every `expired_every`-th row's access token expired a
//! minute ago, the others' stays valid `valid_for` seconds from its last
//! refresh, which is spread over the first fifth of that lifetime.

use std::io::{BufWriter, Write};

use anyhow::Context as _;

use crate::ground::crypto::{Key, Place, Sealer};
use crate::ground::now_ms;
use crate::sandbox::bench;

/// What `bench-rows` writes (its command-line options).
#[derive(Debug, Clone, clap::Args)]
pub struct BenchRows {
    /// The pool the rows belong to.
    #[arg(long, default_value = "users")]
    pub pool: String,
    /// The first user (`u<first>`).
    #[arg(long, default_value_t = 0)]
    pub first: u64,
    /// How many users from there.
    #[arg(long)]
    pub rows: u64,
    /// Every n-th user (by index) has an expired access token; 0: none.
    #[arg(long, default_value_t = 10)]
    pub expired_every: u64,
    /// Lifetime of the valid access tokens, in seconds.
    #[arg(long, default_value_t = 3600)]
    pub valid_for: u64,
    /// The `client_id` claim of the access tokens.
    #[arg(long, default_value = "demo-client")]
    pub client_id: String,
}

/// Writes the rows to stdout, sealed under `key` (base64, as `store.key`).
pub fn bench_rows(rows: &BenchRows, key: &str) -> anyhow::Result<()> {
    let sealer = Sealer::new(
        Key::from_base64(key).map_err(anyhow::Error::msg)?,
        Vec::new(),
    );
    let now = now_ms();
    let valid_ms = i64::try_from(rows.valid_for.saturating_mul(1000)).unwrap_or(i64::MAX);
    let spread = (valid_ms / 5).max(1);
    let stdout = std::io::stdout();
    let mut out = BufWriter::with_capacity(1 << 20, stdout.lock());
    let pool = rows.pool.as_str();
    for i in rows.first..rows.first.saturating_add(rows.rows) {
        let id = format!("u{i}");
        let expired = rows.expired_every > 0 && i % rows.expired_every == 0;
        // A fixed scatter of ages, the same on every run.
        let scatter = i64::try_from(i.wrapping_mul(2_654_435_761) % 1_000_000).unwrap_or(0);
        let (refreshed, expires) = if expired {
            (now - 400_000, now - 60_000)
        } else {
            let refreshed = now - spread * scatter / 1_000_000;
            (refreshed, refreshed + valid_ms)
        };
        let authorized = refreshed - 86_400_000 * (1 + scatter % 20);
        let exp = u64::try_from(expires / 1000).unwrap_or(0);
        let access = bench::access_token(&rows.client_id, &id, exp, &format!("seed-{i}"));
        let seal = |field, plain: &str| {
            sealer
                .seal(
                    Place {
                        pool,
                        id: &id,
                        field,
                    },
                    plain.as_bytes(),
                )
                .with_context(|| format!("sealing {field} of {id}"))
        };
        let refresh_sealed = seal("refresh_token", &bench::refresh_token(i))?;
        let access_sealed = seal("access_token", &access)?;
        writeln!(
            out,
            "{pool}\t{id}\t{id}\tactive\t{authorized}\t{authorized}\t{refreshed}\t{expires}\t{refresh_sealed}\t{access_sealed}"
        )?;
    }
    out.flush()?;
    Ok(())
}
