//! `GET /ui`: the pools with their counts by state, and one pool's
//! connections, searched and paged.
//!
//! The search is a case-insensitive *substring* of the id (`q`), run over
//! the store's pages in id order: at most [`SCAN_BUDGET`] rows are read per
//! page shown, so a search of a large pool is bounded and goes on from
//! where it stopped (`after`, the last id read).

use http::{Response, StatusCode};

use super::auth::Session;
use super::html::{age, escape, hidden, message, page};
use super::Form;
use crate::connections::{valid_id, Pool};
use crate::ground::form;
use crate::ground::now_ms;
use crate::proxy::body::ProxyBody;
use crate::proxy::generation::{AppState, Generation};
use crate::store::{rfc3339, ConnectionInfo, ConnectionState, StoreError};

/// Connections on one page.
const PAGE: usize = 50;
/// Rows read from the store at a time while searching.
const SCAN_BATCH: u32 = 500;
/// Most rows read for one page of a search.
const SCAN_BUDGET: usize = 10_000;
/// Longest search text: an id is at most 128 characters.
const MAX_QUERY: usize = 128;

/// What a page asks for.
struct Query {
    pool: Option<String>,
    q: String,
    after: Option<String>,
}

fn query(form: &Form) -> Result<Query, &'static str> {
    let q = form.get("q").unwrap_or("").trim().to_owned();
    if q.len() > MAX_QUERY {
        return Err("The search text is longer than an id can be (128).");
    }
    let after = form.get("after").filter(|a| !a.is_empty());
    if after.is_some_and(|a| !valid_id(a)) {
        return Err("`after` is not a connection id.");
    }
    Ok(Query {
        pool: form.get("pool").map(str::to_owned),
        q,
        after: after.map(str::to_owned),
    })
}

/// One page of matches, and where the next starts.
struct Found {
    rows: Vec<ConnectionInfo>,
    /// The `after` of the next page, if there may be more.
    next: Option<String>,
    /// The scan stopped at [`SCAN_BUDGET`], not at the end.
    budget_spent: bool,
}

async fn search(pool: &Pool, q: &str, after: Option<String>) -> Result<Found, StoreError> {
    let name = &pool.config().name;
    let needle = q.to_ascii_lowercase();
    let (mut rows, mut cursor, mut scanned) = (Vec::new(), after, 0);
    loop {
        let batch = pool
            .store()
            .list(name, None, cursor.as_deref(), SCAN_BATCH)
            .await?;
        let full = batch.len() == SCAN_BATCH as usize;
        for c in batch {
            scanned += 1;
            cursor = Some(c.id.clone());
            if c.id.to_ascii_lowercase().contains(&needle) {
                rows.push(c);
                if rows.len() > PAGE {
                    rows.truncate(PAGE);
                    let next = rows.last().map(|c| c.id.clone());
                    return Ok(Found {
                        rows,
                        next,
                        budget_spent: false,
                    });
                }
            }
        }
        if !full {
            return Ok(Found {
                rows,
                next: None,
                budget_spent: false,
            });
        }
        if scanned >= SCAN_BUDGET {
            return Ok(Found {
                rows,
                next: cursor,
                budget_spent: true,
            });
        }
    }
}

/// Serves `GET /ui`.
pub async fn show(state: &AppState, session: &Session, raw_query: &str) -> Response<ProxyBody> {
    let csrf = Some(session.csrf());
    let bad = |m: &str| message(StatusCode::BAD_REQUEST, "Bad request", m, csrf);
    let Some(form) = Form::parse(raw_query) else {
        return bad("The query string is not valid urlencoding.");
    };
    let q = match query(&form) {
        Ok(q) => q,
        Err(m) => return bad(m),
    };
    let generation = state.generation.load_full();
    let pool = match &q.pool {
        Some(name) => match generation.pools.get(name) {
            Some(p) => Some(p),
            None => return super::not_found(&format!("No pool {name} is configured."), csrf),
        },
        None => generation.pools.values().next(),
    };
    let pools = match pools_section(&generation, pool.map(|p| p.config().name.as_str())).await {
        Ok(html) => html,
        Err(e) => return super::store_failed(&e, csrf),
    };
    let mut body = pools;
    if let Some(pool) = pool {
        match connections_section(pool, &q, session).await {
            Ok(html) => body.push_str(&html),
            Err(e) => return super::store_failed(&e, csrf),
        }
    }
    match super::webhooks::section(state, session).await {
        Ok(html) => body.push_str(&html),
        Err(e) => return super::store_failed(&e, csrf),
    }
    page(StatusCode::OK, "Connections", &body, csrf)
}

/// The pools table: counts by state, read from the store now.
async fn pools_section(g: &Generation, selected: Option<&str>) -> Result<String, StoreError> {
    if g.pools.is_empty() {
        return Ok(
            "<p class=\"muted\">No <code>[connections.NAME]</code> pool is configured.</p>\n"
                .into(),
        );
    }
    let mut html = String::from(
        "<h2>Pools</h2>\n<table id=\"pools\"><tr><th>pool</th><th>active</th>\
         <th>needs re-authorization</th><th>connect flow</th><th>revocation</th></tr>\n",
    );
    for (name, pool) in &g.pools {
        let counts = pool.store().counts(name).await?;
        let n = |s: ConnectionState| counts.iter().find(|c| c.0 == s).map_or(0, |c| c.1);
        let class = if selected == Some(name.as_str()) {
            " class=\"current\""
        } else {
            ""
        };
        let yes = |b: bool| if b { "yes" } else { "no" };
        html.push_str(&format!(
            "<tr data-pool=\"{e}\"><td><a{class} href=\"/ui?pool={u}\">{e}</a></td>\
             <td class=\"num\">{}</td><td class=\"num\">{}</td><td>{}</td><td>{}</td></tr>\n",
            n(ConnectionState::Active),
            n(ConnectionState::NeedsReauthorization),
            yes(pool.authorize_config().is_some() && g.config.connect.is_some()),
            yes(pool.config().revoke_url.is_some()),
            e = escape(name),
            u = form::encode(name),
        ));
    }
    html.push_str("</table>\n");
    Ok(html)
}

/// The search form, one page of the pool's connections, and the page links.
async fn connections_section(
    pool: &Pool,
    q: &Query,
    session: &Session,
) -> Result<String, StoreError> {
    let name = &pool.config().name;
    let found = search(pool, &q.q, q.after.clone()).await?;
    let mut html = format!(
        "<h2>Connections of {e}</h2>\n<form method=\"get\" action=\"/ui\" id=\"search\">{}\
         <input type=\"search\" id=\"q\" name=\"q\" value=\"{}\" placeholder=\"part of an id\" maxlength=\"128\"> \
         <button type=\"submit\">Search</button> <span class=\"muted\">ids containing the text, any case</span></form>\n",
        hidden("pool", name),
        escape(&q.q),
        e = escape(name),
    );
    if found.rows.is_empty() {
        html.push_str("<p class=\"muted\" id=\"none\">No connection matches.</p>\n");
    } else {
        html.push_str(&table(&found.rows, name, session));
    }
    html.push_str(&page_links(name, q, &found));
    Ok(html)
}

fn table(rows: &[ConnectionInfo], pool: &str, session: &Session) -> String {
    let now = now_ms();
    let mut html = String::from(
        "<table id=\"connections\"><tr><th>id</th><th>state</th><th>last refresh</th>\
         <th>last error</th><th>refresh token idle</th><th></th></tr>\n",
    );
    for c in rows {
        let last_refresh = c
            .last_refresh_at
            .map_or_else(|| "never".to_owned(), rfc3339);
        let idle = age(now - c.last_refresh_at.unwrap_or(c.authorized_at));
        let error = c.last_error.as_ref().map_or_else(String::new, |e| {
            let d = e
                .description
                .as_deref()
                .map(|d| format!(": {d}"))
                .unwrap_or_default();
            format!(
                "<span class=\"err\">{}{}</span><br><span class=\"muted\">{}</span>",
                escape(&e.error),
                escape(&d),
                rfc3339(e.at)
            )
        });
        html.push_str(&format!(
            "<tr data-id=\"{id}\"><td><code>{id}</code></td><td class=\"state-{s}\">{s}</td>\
             <td class=\"muted\">{}</td><td>{error}</td><td class=\"num\">{idle}</td><td class=\"actions\">{}</td></tr>\n",
            escape(&last_refresh),
            actions(pool, &c.id, session),
            id = escape(&c.id),
            s = c.state.as_str(),
        ));
    }
    html.push_str("</table>\n");
    html
}

/// A connection's buttons: the re-authorize link (a POST) and delete (a
/// link to its confirmation page).
fn actions(pool: &str, id: &str, session: &Session) -> String {
    format!(
        "<form class=\"inline\" method=\"post\" action=\"/ui/reauthorize\">{}{}{}\
         <button type=\"submit\" class=\"reauthorize\">Re-authorize link</button></form> \
         <a class=\"delete\" href=\"/ui/delete?{}\">Delete…</a>",
        super::html::csrf_field(session.csrf()),
        hidden("pool", pool),
        hidden("id", id),
        escape(&form::encode_pairs([("pool", pool), ("id", id)])),
    )
}

fn page_links(pool: &str, q: &Query, found: &Found) -> String {
    let mut html = String::from("<nav class=\"pages\">");
    if q.after.is_some() {
        let first = form::encode_pairs([("pool", pool), ("q", q.q.as_str())]);
        html.push_str(&format!(
            "<a href=\"/ui?{}\">First page</a>",
            escape(&first)
        ));
    }
    if let Some(next) = &found.next {
        let link = form::encode_pairs([("pool", pool), ("q", q.q.as_str()), ("after", next)]);
        html.push_str(&format!(
            "<a id=\"next\" href=\"/ui?{}\">Next page</a>",
            escape(&link)
        ));
    }
    if found.budget_spent {
        html.push_str(&format!(
            "<span class=\"muted\">searched {SCAN_BUDGET} connections up to {}; more may match</span>",
            escape(found.next.as_deref().unwrap_or(""))
        ));
    }
    html.push_str("</nav>\n");
    html
}
