//! Ground helpers: what every layer may use and that knows no request,
//! no route and no token. The lock helpers, the clock in Unix milliseconds,
//! secrets ([`secret`]), urlencoding ([`form`]), the metric registry and its typed handles
//! ([`metrics`]) the store's sealing and fingerprint key ([`crypto`]) and JOSE
//! signing keys ([`jose`]).
//!
//! Must not import anything else of the crate.

pub mod crypto;
pub mod form;
pub mod jose;
pub mod metrics;
pub mod secret;

use std::time::{SystemTime, UNIX_EPOCH};

/// Locks a std mutex, ignoring poisoning: every mutex in the crate guards
/// plain data that a panicking holder cannot leave half-written (counters,
/// option swaps, queues), so the data stays usable and a panic elsewhere
/// must not take the proxy down with it.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Read-locks a std `RwLock`, ignoring poisoning (as [`lock`]).
pub(crate) fn read<T>(l: &std::sync::RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Write-locks a std `RwLock`, ignoring poisoning (as [`lock`]).
pub(crate) fn write<T>(l: &std::sync::RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Unix seconds now.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Now in Unix milliseconds.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}
