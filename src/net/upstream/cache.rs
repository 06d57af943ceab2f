//! [`UpstreamCache`]: the pools by origin, trust roots and client
//! certificate, kept across reloads, and the reaper task that closes their
//! idle connections.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use http::uri::{Authority, Scheme};
use http::Uri;
use rustls::pki_types::CertificateDer;
use tokio::sync::Notify;

use super::capacity::Capacity;
use super::h1::IdleList;
use super::h2::H2List;
use super::{connector, PoolTimings, Protocol, Upstream};
use crate::ground::lock;
use crate::net::tls::ClientCert;

/// What makes two routes share a pool: trust roots, origin and the client
/// certificate presented (a connection made with one certificate must never
/// carry another route's requests: the upstream authenticated it as that
/// client).
type PoolKey = (
    Vec<CertificateDer<'static>>,
    Option<Vec<CertificateDer<'static>>>,
    Scheme,
    Authority,
);
type Pools = Mutex<HashMap<PoolKey, Arc<Upstream>>>;

/// Upstream pools by origin, trust roots and client certificate, shared by
/// routes and kept across reloads; owns the reaper task that closes idle
/// connections.
pub struct UpstreamCache {
    pools: Arc<Pools>,
    timings: Arc<ArcSwap<PoolTimings>>,
    /// Wakes the reaper to pick up new timings.
    timings_changed: Arc<Notify>,
    reaper: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Default for UpstreamCache {
    fn default() -> Self {
        UpstreamCache {
            pools: Arc::default(),
            timings: Arc::new(ArcSwap::from_pointee(PoolTimings::default())),
            timings_changed: Arc::default(),
            reaper: Mutex::new(None),
        }
    }
}

impl Drop for UpstreamCache {
    fn drop(&mut self) {
        if let Some(task) = lock(&self.reaper).take() {
            task.abort();
        }
    }
}

impl UpstreamCache {
    /// The pool for this origin, these extra roots and this client
    /// certificate, made on first use. Routes sharing a pool share its
    /// connection limit, the largest of theirs: the pool serves them all,
    /// and a smaller limit from one route would throttle the others.
    pub fn get(
        &self,
        scheme: &Scheme,
        authority: &Authority,
        extra_roots: &[CertificateDer<'static>],
        identity: Option<&ClientCert>,
        max_connections: usize,
    ) -> Result<Arc<Upstream>, String> {
        self.spawn_reaper();
        let key = (
            extra_roots.to_vec(),
            identity.map(|c| c.chain().to_vec()),
            scheme.clone(),
            authority.clone(),
        );
        let mut pools = lock(&self.pools);
        if let Some(u) = pools.get(&key) {
            u.cap.raise_max(max_connections);
            return Ok(Arc::clone(u));
        }
        let origin = Uri::builder()
            .scheme(scheme.clone())
            .authority(authority.clone())
            .path_and_query("/")
            .build()
            .map_err(|e| e.to_string())?;
        let u = Arc::new(Upstream {
            origin,
            connector: connector(extra_roots, identity)?,
            timings: Arc::clone(&self.timings),
            cap: Capacity::new(max_connections),
            idle: IdleList::default(),
            h2: H2List::default(),
            // Plain TCP is HTTP/1.1 (no h2c towards upstreams); TLS says by ALPN.
            protocol: AtomicU8::new(if *scheme == Scheme::HTTP {
                Protocol::Http1 as u8
            } else {
                Protocol::Unknown as u8
            }),
            retired: AtomicBool::new(false),
            drains: AtomicUsize::new(0),
        });
        pools.insert(key, Arc::clone(&u));
        Ok(u)
    }

    /// After a reload: keeps the pools the current routes use, each with the
    /// largest limit of its routes, and drops every other pool, closing its
    /// idle connections (exchanges in flight finish, then close).
    pub fn retain<'a>(&self, used: impl IntoIterator<Item = (&'a Arc<Upstream>, usize)>) {
        let mut limits: Vec<(&Arc<Upstream>, usize)> = Vec::new();
        for (u, max) in used {
            match limits.iter_mut().find(|(k, _)| Arc::ptr_eq(k, u)) {
                Some((_, m)) => *m = (*m).max(max),
                None => limits.push((u, max)),
            }
        }
        lock(&self.pools).retain(|_, u| match limits.iter().find(|(k, _)| Arc::ptr_eq(k, u)) {
            Some((_, max)) => {
                u.cap.set_max(*max);
                true
            }
            None => {
                tracing::debug!(upstream = %u.origin, "no route uses this upstream any more; pool dropped");
                u.retire();
                false
            }
        });
    }

    /// Replaces the pool timers (tests); new connections and the reaper's
    /// next round use them.
    #[doc(hidden)]
    pub fn set_timings(&self, timings: PoolTimings) {
        self.timings.store(Arc::new(timings));
        self.timings_changed.notify_one();
    }

    /// Starts the reaper on first use (inside a runtime).
    fn spawn_reaper(&self) {
        let mut reaper = lock(&self.reaper);
        if reaper.is_some() {
            return;
        }
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let pools = Arc::downgrade(&self.pools);
        let timings = Arc::clone(&self.timings);
        let changed = Arc::clone(&self.timings_changed);
        *reaper = Some(handle.spawn(async move {
            loop {
                let idle_timeout = timings.load().idle_timeout;
                // A connection is closed at most a quarter of the timeout late.
                let period = (idle_timeout / 4).max(Duration::from_millis(10));
                tokio::select! {
                    () = tokio::time::sleep(period) => {}
                    () = changed.notified() => continue,
                }
                let Some(pools) = pools.upgrade() else {
                    return;
                };
                let list: Vec<Arc<Upstream>> = lock(&pools).values().cloned().collect();
                drop(pools);
                for u in list {
                    u.reap(idle_timeout);
                }
            }
        }));
    }
}
