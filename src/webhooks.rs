//! Lifecycle events delivered to the app (CONNECT.md, "Lifecycle events
//! (webhooks)"): the deliverer drains the store's outbox (`store/outbox.rs`,
//! filled by triggers in the same transaction as each change) and POSTs
//! each event per the Standard Webhooks specification (`webhooks/sign.rs`).
//!
//! At least once, in order per connection: an event is claimed with a
//! lease (one replica delivers it), retried with exponential backoff and
//! jitter on network errors, timeouts, 5xx and 429 (`Retry-After`
//! honoured) under the same `webhook-id`, and given up only after
//! `max_age` (`expired`) or on another 4xx (`rejected`). The next event of
//! a connection waits for the previous one (the outbox hands out only a
//! subject's oldest pending event).

mod sign;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, StatusCode};
use http_body_util::Full;
use tokio_util::sync::CancellationToken;

use crate::config::WebhooksConfig;
use crate::ground::metrics::WebhookMetrics;
use crate::ground::now_ms;
use crate::net::upstream::{build_client, HttpClient};
use crate::store::{retry_while_unavailable, rfc3339, Attempt, Store, WebhookEvent};

pub use sign::signature;

/// How often the outbox is looked at when it had nothing due.
pub const POLL: Duration = Duration::from_millis(250);
/// How often the queue's gauges are read when nothing was delivered.
const GAUGE_EVERY_MS: i64 = 5_000;
/// Events claimed (and delivered concurrently) at once.
const BATCH: u32 = 32;
/// A claim outlives the attempt's timeout by this much.
const LEASE_MARGIN: Duration = Duration::from_secs(30);
/// The first retry's delay; it doubles per attempt up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
/// The longest delay between attempts (a receiver back after an outage
/// hears within this long).
const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// The longest `Retry-After` honoured.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);
/// Finished events are kept this long for the admin API.
const KEEP_FINISHED_MS: i64 = 7 * 24 * 3600 * 1000;
/// Without `[webhooks]`, events no replica delivered are pruned after
/// this long (longer than any `max_age`, so a replica that has webhooks
/// during a rolling change still gets them).
const KEEP_UNDELIVERED_MS: i64 = 8 * 24 * 3600 * 1000;
/// How often old events are pruned.
const PRUNE_EVERY_MS: i64 = 60_000;

type Client = HttpClient<Full<Bytes>>;

/// Runs the deliverer until `shutdown`: each round follows the current
/// `[webhooks]` (`current`, so reloads apply), delivers what is due,
/// refreshes the queue gauges and now and then prunes old events.
pub async fn run(
    store: Arc<Store>,
    current: impl Fn() -> Option<WebhooksConfig>,
    metrics: WebhookMetrics,
    shutdown: CancellationToken,
) {
    let mut client: Option<(WebhooksConfig, Client)> = None;
    let mut last_prune = 0;
    let mut last_gauge = 0;
    loop {
        let config = current();
        let mut full = false;
        let mut claimed = 0;
        if let Some(c) = &config {
            store.set_refresh_failing_after(c.refresh_failing_after);
            if client
                .as_ref()
                .is_none_or(|(was, _)| was.ca_certs != c.ca_certs)
            {
                client = build_client(&c.ca_certs, None)
                    .map_err(
                        |e| tracing::warn!(error = %e, "webhooks: cannot build the HTTP client"),
                    )
                    .ok()
                    .map(|cl| (c.clone(), cl));
            }
            if let Some((_, cl)) = &client {
                claimed = deliver_due(&store, c, cl, &metrics).await;
                full = claimed == BATCH as usize;
            }
        }
        // The queue's gauges: after a round that delivered, else every
        // GAUGE_EVERY_MS (events queued meanwhile, here or by another
        // replica), not at every poll.
        let now = now_ms();
        if claimed > 0 || now.saturating_sub(last_gauge) >= GAUGE_EVERY_MS {
            if let Ok(q) = store.webhook_queue().await {
                let age = q.oldest.map_or(0, |t| now_ms().saturating_sub(t).max(0));
                metrics.set_queue(q.pending, Duration::from_millis(age.unsigned_abs()));
                last_gauge = now;
            }
        }
        if now.saturating_sub(last_prune) >= PRUNE_EVERY_MS {
            last_prune = now;
            let pending_before = config
                .is_none()
                .then(|| now.saturating_sub(KEEP_UNDELIVERED_MS));
            let _ = store
                .prune_events(now.saturating_sub(KEEP_FINISHED_MS), pending_before)
                .await;
        }
        if full {
            continue;
        }
        tokio::select! {
            () = tokio::time::sleep(POLL) => {}
            () = shutdown.cancelled() => return,
        }
    }
}

/// Claims what is due and delivers it concurrently (events of different
/// connections); how many were claimed.
async fn deliver_due(
    store: &Store,
    config: &WebhooksConfig,
    client: &Client,
    metrics: &WebhookMetrics,
) -> usize {
    let lease = config.timeout.saturating_add(LEASE_MARGIN);
    let events = match store.claim_events(BATCH, lease).await {
        Ok(e) => e,
        Err(_) => return 0,
    };
    let n = events.len();
    let attempts = events.into_iter().map(|ev| async move {
        if !config.wants(&ev.kind) {
            let _ = store.drop_event(&ev).await;
            return;
        }
        let attempt = attempt(client, config, &ev).await;
        let outcome = match &attempt {
            Attempt::Delivered { .. } => "delivered",
            Attempt::Retry { .. } => "retried",
            Attempt::GiveUp { outcome, .. } => outcome,
        };
        metrics.delivery(outcome);
        match &attempt {
            Attempt::Delivered { .. } => {
                tracing::debug!(id = %ev.id, kind = %ev.kind, "webhook delivered")
            }
            Attempt::Retry { error, .. } => {
                tracing::warn!(id = %ev.id, kind = %ev.kind, attempts = ev.attempts + 1, %error, "webhook not delivered; will retry")
            }
            Attempt::GiveUp { outcome, error, .. } => {
                tracing::error!(id = %ev.id, kind = %ev.kind, %outcome, %error, "webhook given up")
            }
        }
        // The answer is known: keep it through a short store outage (the
        // lease would otherwise make the event wait for its expiry, then
        // be sent again).
        let record = || store.record_attempt(&ev, &attempt);
        if let Err(e) = retry_while_unavailable(lease, record).await {
            tracing::warn!(id = %ev.id, error = %e, "webhook outcome not recorded; it is sent again when its lease ends");
        }
    });
    futures_util::future::join_all(attempts).await;
    n
}

/// The body the receiver gets: `{"type", "timestamp", "data"}`.
pub fn body(ev: &WebhookEvent) -> String {
    serde_json::json!({
        "type": ev.kind,
        "timestamp": rfc3339(ev.occurred_at),
        "data": ev.data,
    })
    .to_string()
}

/// One attempt and what it means for the event.
async fn attempt(client: &Client, config: &WebhooksConfig, ev: &WebhookEvent) -> Attempt {
    let max_age = i64::try_from(config.max_age.as_millis()).unwrap_or(i64::MAX);
    let deadline = ev.attempts_since.saturating_add(max_age);
    // An event is always tried once more when its turn comes, however
    // late (a proxy that was down longer than max_age; the last retry is
    // scheduled at the deadline): only a failed attempt past it expires.
    let (status, retry_after, error) = match send(client, config, ev).await {
        Ok((s, _)) if s.is_success() => return Attempt::Delivered { status: s.as_u16() },
        Ok((s, ra)) if s == StatusCode::TOO_MANY_REQUESTS || s.is_server_error() => {
            (Some(s.as_u16()), ra, format!("the receiver answered {s}"))
        }
        Ok((s, _)) => {
            return Attempt::GiveUp {
                outcome: "rejected",
                status: Some(s.as_u16()),
                error: format!("the receiver answered {s}"),
            }
        }
        Err(e) => (None, None, e),
    };
    let delay = retry_after
        .map(|d| d.min(MAX_RETRY_AFTER))
        .unwrap_or_else(|| backoff(ev.attempts));
    let now = now_ms();
    let delay_ms = i64::try_from(delay.as_millis()).unwrap_or(i64::MAX);
    if now >= deadline {
        return Attempt::GiveUp {
            outcome: "expired",
            status,
            error,
        };
    }
    Attempt::Retry {
        at: now.saturating_add(delay_ms).min(deadline),
        status,
        error,
    }
}

/// Exponential backoff with jitter: about 1 s, 2 s, 4 s, … up to 5 min,
/// each drawn from its upper half so replicas and events spread out.
fn backoff(attempts: i64) -> Duration {
    let exp = u32::try_from(attempts.clamp(0, 16)).unwrap_or(16);
    let full = FIRST_BACKOFF
        .saturating_mul(2u32.saturating_pow(exp))
        .min(MAX_BACKOFF);
    full.mul_f64(0.5 + rand::random::<f64>() / 2.0)
}

/// POSTs the event; its status and `Retry-After`, or why there was none.
async fn send(
    client: &Client,
    config: &WebhooksConfig,
    ev: &WebhookEvent,
) -> Result<(StatusCode, Option<Duration>), String> {
    let body = body(ev);
    let timestamp = now_ms().div_euclid(1000);
    let sig = signature(&config.key, &ev.id, timestamp, body.as_bytes());
    let req = Request::builder()
        .method(Method::POST)
        .uri(config.url.clone())
        .header(header::CONTENT_TYPE, "application/json")
        .header(
            header::USER_AGENT,
            concat!("flinks-proxy/", env!("CARGO_PKG_VERSION")),
        )
        .header("webhook-id", &ev.id)
        .header("webhook-timestamp", timestamp.to_string())
        .header("webhook-signature", sig)
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| format!("cannot build the request: {e}"))?;
    let resp = match tokio::time::timeout(config.timeout, client.request(req)).await {
        Err(_) => return Err(format!("no answer within {:?}", config.timeout)),
        Ok(Err(e)) => return Err(format!("cannot reach the receiver: {}", error_chain(&e))),
        Ok(Ok(r)) => r,
    };
    let retry_after = resp
        .headers()
        .get(header::RETRY_AFTER)
        .and_then(retry_after);
    Ok((resp.status(), retry_after))
}

/// `Retry-After`: seconds or an HTTP date.
fn retry_after(v: &HeaderValue) -> Option<Duration> {
    let s = v.to_str().ok()?.trim();
    if let Ok(secs) = s.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(s).ok()?;
    Some(
        at.duration_since(std::time::SystemTime::now())
            .unwrap_or_default(),
    )
}

/// An error and its sources, one line (hyper's own message is terse).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_and_is_capped() {
        for attempts in 0..20 {
            let full = FIRST_BACKOFF
                .saturating_mul(2u32.saturating_pow(u32::try_from(attempts.min(16)).unwrap()))
                .min(MAX_BACKOFF);
            let d = backoff(attempts);
            assert!(d >= full / 2 && d <= full, "{attempts}: {d:?}");
        }
        assert!(backoff(100) <= MAX_BACKOFF);
        assert!(backoff(-3) <= FIRST_BACKOFF);
    }

    #[test]
    fn retry_after_reads_seconds_and_dates() {
        let v = |s: &'static str| HeaderValue::from_static(s);
        assert_eq!(retry_after(&v("7")), Some(Duration::from_secs(7)));
        assert_eq!(
            retry_after(&v("Wed, 21 Oct 2015 07:28:00 GMT")),
            Some(Duration::ZERO)
        );
        let later =
            httpdate::fmt_http_date(std::time::SystemTime::now() + Duration::from_secs(120));
        let d = retry_after(&HeaderValue::from_str(&later).unwrap()).unwrap();
        assert!(
            d > Duration::from_secs(100) && d <= Duration::from_secs(120),
            "{d:?}"
        );
        assert_eq!(retry_after(&v("soon")), None);
    }
}
