//! SQL written once for both backends: `?` placeholders, numbered for
//! PostgreSQL ([`numbered`]), run by [`run!`] on whichever backend is
//! configured. Used where the two dialects agree (connect sessions, the
//! webhook outbox).

/// `?` placeholders as PostgreSQL's `$1`, `$2`, … (the SQL given has no
/// `?` anywhere else).
pub(super) fn numbered(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len() + 8);
    let mut n = 0;
    for c in sql.chars() {
        if c == '?' {
            n += 1;
            out.push_str(&format!("${n}"));
        } else {
            out.push(c);
        }
    }
    out
}

/// Runs `$sql` with `$args` bound on whichever backend is configured:
/// `rows T` gives the rows as `T`, `exec` the rows affected.
macro_rules! run {
    (rows $row:ty, $self:ident, $op:literal, $sql:expr, [$($arg:expr),*]) => {
        match &$self.backend {
            Backend::Sqlite(b) => {
                b.check_file().await?;
                sqlx::query_as::<_, $row>(&$sql)$(.bind($arg))*
                    .fetch_all(b.pool()).await.map_err(unavailable($op))
            }
            Backend::Postgres(b) => {
                sqlx::query_as::<_, $row>(&$crate::store::sql::numbered(&$sql))$(.bind($arg))*
                    .fetch_all(b.pool()).await.map_err(unavailable($op))
            }
        }
    };
    (exec $self:ident, $op:literal, $sql:expr, [$($arg:expr),*]) => {
        match &$self.backend {
            Backend::Sqlite(b) => {
                b.check_file().await?;
                sqlx::query(&$sql)$(.bind($arg))*
                    .execute(b.pool()).await.map(|r| r.rows_affected()).map_err(unavailable($op))
            }
            Backend::Postgres(b) => {
                sqlx::query(&$crate::store::sql::numbered(&$sql))$(.bind($arg))*
                    .execute(b.pool()).await.map(|r| r.rows_affected()).map_err(unavailable($op))
            }
        }
    };
}
pub(super) use run;

#[cfg(test)]
mod tests {
    use super::numbered;

    #[test]
    fn placeholders_are_numbered_for_postgres() {
        assert_eq!(
            numbered("UPDATE t SET a = ? WHERE b = ? AND c = ?"),
            "UPDATE t SET a = $1 WHERE b = $2 AND c = $3"
        );
    }
}
