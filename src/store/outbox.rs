//! The webhook outbox (CONNECT.md, "Lifecycle events"): the rows the
//! migrations' triggers write in the same transaction as each change to a
//! connection or a connect session, and the operations the deliverer
//! (`webhooks`) and the admin API use on them.
//!
//! A delivery takes a lease on its row, as a refresh does on a
//! connection's: across replicas one of them delivers each event, and a
//! holder that died frees it by expiry (SQLite: at the next start). Only
//! the oldest pending event of a subject (a connection, a session) is
//! handed out, so order per connection is kept. The SQL is the same for
//! both backends (`?` placeholders, numbered for PostgreSQL).

use serde::Deserialize;

use super::sql::run;
use super::{unavailable, Backend, Store, StoreError};
use super::{ConnectionInfo, ConnectionState, LastError, Session, SessionPhase, SessionStatus};
use crate::ground::now_ms;

/// Where an event stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventState {
    /// Not delivered yet (waiting for its turn, its next attempt, or on
    /// its way).
    Pending,
    /// A 2xx answered it.
    Delivered,
    /// Given up: `rejected` (a 4xx) or `expired` (`max_age`).
    Failed,
}

impl EventState {
    /// The stored and JSON spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            EventState::Pending => "pending",
            EventState::Delivered => "delivered",
            EventState::Failed => "failed",
        }
    }

    /// Parses the stored spelling.
    pub fn parse(s: &str) -> Option<EventState> {
        match s {
            "pending" => Some(EventState::Pending),
            "delivered" => Some(EventState::Delivered),
            "failed" => Some(EventState::Failed),
            _ => None,
        }
    }
}

/// One lifecycle event.
#[derive(Debug, Clone)]
pub struct WebhookEvent {
    seq: i64,
    /// The `webhook-id` (`msg_…`), the same on every attempt.
    pub id: String,
    /// `connection.created`, …
    pub kind: String,
    /// The connection (or session) as the admin API shows it, as of the
    /// change: never a token.
    pub data: serde_json::Value,
    /// Unix milliseconds of the change.
    pub occurred_at: i64,
    /// Where it stands.
    pub state: EventState,
    /// How it ended: `delivered`, `rejected`, `expired`.
    pub outcome: Option<String>,
    /// Attempts made.
    pub attempts: i64,
    /// Unix milliseconds of the next attempt (pending).
    pub next_attempt_at: i64,
    /// `max_age` counts from here (Unix milliseconds).
    pub attempts_since: i64,
    /// The receiver's last HTTP status.
    pub last_status: Option<i64>,
    /// Why the last attempt failed (no secret: a status or an I/O error).
    pub last_error: Option<String>,
    /// Unix milliseconds of the end.
    pub finished_at: Option<i64>,
}

impl WebhookEvent {
    /// The admin API's JSON.
    pub fn to_json(&self) -> serde_json::Value {
        let t = |ms: Option<i64>| ms.map(super::rfc3339);
        let pending = self.state == EventState::Pending;
        serde_json::json!({
            "id": self.id,
            "type": self.kind,
            "state": self.state.as_str(),
            "outcome": self.outcome,
            "attempts": self.attempts,
            "occurred_at": super::rfc3339(self.occurred_at),
            "next_attempt_at": t(pending.then_some(self.next_attempt_at)),
            "last_status": self.last_status,
            "last_error": self.last_error,
            "finished_at": t(self.finished_at),
            "data": self.data,
        })
    }
}

const COLUMNS: &str = "seq, id, type, subject, data, occurred_at, attempts_since, state, \
     attempts, next_attempt_at, last_status, last_error, outcome, finished_at";

#[derive(sqlx::FromRow)]
struct EventRow {
    seq: i64,
    id: String,
    #[sqlx(rename = "type")]
    kind: String,
    subject: String,
    data: String,
    occurred_at: i64,
    attempts_since: Option<i64>,
    state: String,
    attempts: i32,
    next_attempt_at: i64,
    last_status: Option<i32>,
    last_error: Option<String>,
    outcome: Option<String>,
    finished_at: Option<i64>,
}

/// A connection's row as the triggers write it.
#[derive(Deserialize)]
struct ConnectionData {
    pool: String,
    id: String,
    sub: Option<String>,
    state: String,
    last_error: Option<String>,
    last_error_description: Option<String>,
    last_error_at: Option<i64>,
    created_at: i64,
    authorized_at: i64,
    last_refresh_at: Option<i64>,
    access_token_expires_at: Option<i64>,
}

/// A connect session's row as the trigger writes it.
#[derive(Deserialize)]
struct SessionData {
    session_id: String,
    pool: String,
    connection_id: Option<String>,
    redirect_to: Option<String>,
    error: Option<String>,
    error_description: Option<String>,
    created_at: i64,
    expires_at: i64,
    finished_at: Option<i64>,
}

/// The admin API's JSON of what a trigger wrote: the same function renders
/// both, so an event's `data` is what `GET` would have answered then.
/// A page of [`Store::list_events`], in `state` when `by_state`: read in
/// `seq` order from `webhook_events_listed` (migration 0006) or the
/// primary key.
pub(super) fn page_sql(by_state: bool) -> String {
    let filter = if by_state { "state = ? AND" } else { "" };
    format!("SELECT {COLUMNS} FROM webhook_events WHERE {filter} seq > ? ORDER BY seq LIMIT ?")
}

/// [`Store::latest_events`]: backwards down `webhook_events_listed`.
pub(super) fn latest_sql() -> String {
    format!("SELECT {COLUMNS} FROM webhook_events WHERE state = ? ORDER BY seq DESC LIMIT ?")
}

fn render(subject: &str, raw: &str) -> serde_json::Value {
    let rendered = if subject.starts_with("session/") {
        serde_json::from_str::<SessionData>(raw).ok().map(|s| {
            Session {
                id: s.session_id,
                pool: s.pool,
                status: SessionStatus::Failed,
                phase: SessionPhase::Exchanging,
                connection_id: s.connection_id,
                redirect_to: s.redirect_to,
                authorize_params: Vec::new(),
                browser_hash: None,
                code_verifier: None,
                error: s.error,
                error_description: s.error_description,
                created_at: s.created_at,
                expires_at: s.expires_at,
                finished_at: s.finished_at,
            }
            .to_json(now_ms())
        })
    } else {
        serde_json::from_str::<ConnectionData>(raw).ok().map(|c| {
            ConnectionInfo {
                pool: c.pool,
                id: c.id,
                sub: c.sub,
                state: ConnectionState::parse(&c.state).unwrap_or(ConnectionState::Active),
                last_error: c.last_error.map(|error| LastError {
                    error,
                    description: c.last_error_description,
                    at: c.last_error_at.unwrap_or(0),
                }),
                created_at: c.created_at,
                authorized_at: c.authorized_at,
                last_refresh_at: c.last_refresh_at,
                access_token_expires_at: c.access_token_expires_at,
            }
            .to_json()
        })
    };
    rendered.unwrap_or_else(|| serde_json::from_str(raw).unwrap_or(serde_json::Value::Null))
}

fn event(r: EventRow) -> WebhookEvent {
    WebhookEvent {
        seq: r.seq,
        data: render(&r.subject, &r.data),
        id: r.id,
        kind: r.kind,
        occurred_at: r.occurred_at,
        attempts_since: r.attempts_since.unwrap_or(r.occurred_at),
        state: EventState::parse(&r.state).unwrap_or(EventState::Pending),
        attempts: i64::from(r.attempts),
        next_attempt_at: r.next_attempt_at,
        last_status: r.last_status.map(i64::from),
        last_error: r.last_error,
        outcome: r.outcome,
        finished_at: r.finished_at,
    }
}

/// How an attempt ended, as the outbox records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attempt {
    /// A 2xx.
    Delivered { status: u16 },
    /// Try again at `at` (Unix milliseconds).
    Retry {
        at: i64,
        status: Option<u16>,
        error: String,
    },
    /// Given up after this attempt: `rejected` (a 4xx) or `expired`.
    GiveUp {
        outcome: &'static str,
        status: Option<u16>,
        error: String,
    },
}

/// The webhook queue as metrics show it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Queue {
    /// Pending events.
    pub pending: u64,
    /// Unix milliseconds of the oldest pending event's change.
    pub oldest: Option<i64>,
}

impl Store {
    /// Takes the delivery lease of up to `limit` events that are due: the
    /// oldest pending event of each subject whose next attempt has come and
    /// whose lease is free or expired. Another replica's lease is never
    /// taken while it lasts (the `WHERE` is checked again on the row).
    pub async fn claim_events(
        &self,
        limit: u32,
        lease: std::time::Duration,
    ) -> Result<Vec<WebhookEvent>, StoreError> {
        let now = now_ms();
        let until = now.saturating_add(i64::try_from(lease.as_millis()).unwrap_or(i64::MAX));
        self.timed("webhook_claim", async {
            let sql = format!(
                "UPDATE webhook_events SET lease_owner = ?, lease_until = ? \
                 WHERE (lease_until IS NULL OR lease_until < ?) AND state = 'pending' \
                 AND seq IN (SELECT e.seq FROM webhook_events e \
                   WHERE e.state = 'pending' AND e.next_attempt_at <= ? \
                   AND (e.lease_until IS NULL OR e.lease_until < ?) \
                   AND NOT EXISTS (SELECT 1 FROM webhook_events p WHERE p.state = 'pending' \
                     AND p.subject = e.subject AND p.seq < e.seq) \
                   ORDER BY e.seq LIMIT ?) \
                 RETURNING {COLUMNS}"
            );
            let rows = run!(rows EventRow, self, "webhook_claim", sql,
                [&self.holder, until, now, now, now, i64::from(limit)])?;
            let mut events: Vec<WebhookEvent> = rows.into_iter().map(event).collect();
            events.sort_by_key(|e| e.seq);
            Ok(events)
        })
        .await
    }

    /// Records how an attempt of a claimed event ended and frees its
    /// lease; whether this holder still held it.
    pub async fn record_attempt(
        &self,
        ev: &WebhookEvent,
        attempt: &Attempt,
    ) -> Result<bool, StoreError> {
        let now = now_ms();
        self.timed("webhook_record", async {
            let tried = "lease_owner = NULL, lease_until = NULL, attempts = attempts + 1";
            let n = match attempt {
                Attempt::Delivered { status } => {
                    let sql = format!(
                        "UPDATE webhook_events SET state = 'delivered', outcome = 'delivered', \
                         last_status = ?, last_error = NULL, finished_at = ?, {tried} \
                         WHERE seq = ? AND lease_owner = ?"
                    );
                    run!(exec self, "webhook_record", sql,
                        [i32::from(*status), now, ev.seq, &self.holder])?
                }
                Attempt::Retry { at, status, error } => {
                    let sql = format!(
                        "UPDATE webhook_events SET next_attempt_at = ?, last_status = ?, \
                         last_error = ?, {tried} WHERE seq = ? AND lease_owner = ?"
                    );
                    run!(exec self, "webhook_record", sql,
                        [*at, status.map(i32::from), error, ev.seq, &self.holder])?
                }
                Attempt::GiveUp {
                    outcome,
                    status,
                    error,
                } => {
                    let sql = format!(
                        "UPDATE webhook_events SET state = 'failed', outcome = ?, \
                         last_status = COALESCE(?, last_status), last_error = ?, \
                         finished_at = ?, {tried} \
                         WHERE seq = ? AND lease_owner = ?"
                    );
                    run!(exec self, "webhook_record", sql,
                        [*outcome, status.map(i32::from), error, now, ev.seq, &self.holder])?
                }
            };
            Ok(n > 0)
        })
        .await
    }

    /// Drops a claimed event no receiver wants (its type is not in
    /// `[webhooks] events`).
    pub async fn drop_event(&self, ev: &WebhookEvent) -> Result<(), StoreError> {
        self.timed("webhook_record", async {
            let sql = "DELETE FROM webhook_events WHERE seq = ? AND lease_owner = ?";
            run!(exec self, "webhook_record", sql, [ev.seq, &self.holder])?;
            Ok(())
        })
        .await
    }

    /// A page of events in order, in `state` (any when `None`), after the
    /// event `after` (an id), at most `limit`.
    pub async fn list_events(
        &self,
        state: Option<EventState>,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<WebhookEvent>, StoreError> {
        self.timed("webhook_list", async {
            let after_seq = match after {
                None => 0,
                Some(id) => {
                    let sql = format!("SELECT {COLUMNS} FROM webhook_events WHERE id = ?");
                    let rows = run!(rows EventRow, self, "webhook_list", sql, [id])?;
                    match rows.first() {
                        Some(r) => r.seq,
                        None => return Ok(Vec::new()),
                    }
                }
            };
            let sql = page_sql(state.is_some());
            let rows = match state {
                Some(s) => run!(rows EventRow, self, "webhook_list", sql,
                    [s.as_str(), after_seq, i64::from(limit)])?,
                None => run!(rows EventRow, self, "webhook_list", sql,
                    [after_seq, i64::from(limit)])?,
            };
            Ok(rows.into_iter().map(event).collect())
        })
        .await
    }

    /// The latest `limit` events in `state`, oldest of them first (the
    /// operator page's view: one read down `webhook_events_listed`,
    /// however long the history).
    pub async fn latest_events(
        &self,
        state: EventState,
        limit: u32,
    ) -> Result<Vec<WebhookEvent>, StoreError> {
        self.timed("webhook_list", async {
            let rows = run!(rows EventRow, self, "webhook_list", latest_sql(),
                [state.as_str(), i64::from(limit)])?;
            let mut events: Vec<WebhookEvent> = rows.into_iter().map(event).collect();
            events.reverse();
            Ok(events)
        })
        .await
    }

    /// One event by id.
    pub async fn webhook_event(&self, id: &str) -> Result<Option<WebhookEvent>, StoreError> {
        self.timed("webhook_list", async {
            let sql = format!("SELECT {COLUMNS} FROM webhook_events WHERE id = ?");
            let rows = run!(rows EventRow, self, "webhook_list", sql, [id])?;
            Ok(rows.into_iter().next().map(event))
        })
        .await
    }

    /// Makes an event pending and due now, whatever its state (an operator
    /// asks again after fixing the receiver): `max_age` counts from now.
    /// The event as it now stands, `None` when there is none.
    pub async fn retry_event(&self, id: &str) -> Result<Option<WebhookEvent>, StoreError> {
        let now = now_ms();
        self.timed("webhook_retry", async {
            let sql = format!(
                "UPDATE webhook_events SET state = 'pending', outcome = NULL, finished_at = NULL, \
                 next_attempt_at = ?, attempts_since = ? WHERE id = ? RETURNING {COLUMNS}"
            );
            let rows = run!(rows EventRow, self, "webhook_retry", sql, [now, now, id])?;
            Ok(rows.into_iter().next().map(event))
        })
        .await
    }

    /// Pending events and the oldest one's time.
    pub async fn webhook_queue(&self) -> Result<Queue, StoreError> {
        #[derive(sqlx::FromRow)]
        struct Row {
            n: i64,
            oldest: Option<i64>,
        }
        self.timed("webhook_queue", async {
            let sql = "SELECT COUNT(*) AS n, MIN(occurred_at) AS oldest FROM webhook_events \
                       WHERE state = 'pending'";
            let rows = run!(rows Row, self, "webhook_queue", sql, [])?;
            let r = rows.into_iter().next();
            Ok(Queue {
                pending: r.as_ref().map_or(0, |r| u64::try_from(r.n).unwrap_or(0)),
                oldest: r.and_then(|r| r.oldest),
            })
        })
        .await
    }

    /// Deletes finished events that ended before `finished_before`, and
    /// pending ones whose change is older than `pending_before` (none:
    /// keep them); how many.
    pub async fn prune_events(
        &self,
        finished_before: i64,
        pending_before: Option<i64>,
    ) -> Result<u64, StoreError> {
        self.timed("webhook_prune", async {
            let sql = "DELETE FROM webhook_events WHERE state <> 'pending' AND finished_at < ?";
            let mut n = run!(exec self, "webhook_prune", sql, [finished_before])?;
            if let Some(before) = pending_before {
                let sql = "DELETE FROM webhook_events WHERE state = 'pending' AND occurred_at < ? \
                           AND (lease_until IS NULL OR lease_until < ?)";
                n += run!(exec self, "webhook_prune", sql, [before, now_ms()])?;
            }
            Ok(n)
        })
        .await
    }
}
