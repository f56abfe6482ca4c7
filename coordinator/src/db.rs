//! One way to speak SQL to either database the coordinator keeps its state in:
//! SQLite (rusqlite, bundled: the embedded default) or PostgreSQL (the
//! `postgres` client). Each statement is written once, with `?1`-style
//! placeholders (rewritten to `$1` for PostgreSQL) and SQL both understand
//! (`ON CONFLICT … DO UPDATE`, `RETURNING`); integers are `i64` (`BIGINT`).
//!
//! The `postgres` client runs its own runtime, which may not be entered from a
//! thread that drives tokio (the control loop's, a `spawn_blocking` one): its
//! calls run on a scoped thread of their own (`off_runtime`).

use std::collections::HashMap;

use crate::{Error, Result};

/// A value a statement takes: what both databases can bind.
pub trait Param: rusqlite::ToSql + postgres::types::ToSql + Sync {}
impl<T: rusqlite::ToSql + postgres::types::ToSql + Sync> Param for T {}

/// A value a row gives: what both databases can read.
pub trait Column: rusqlite::types::FromSql + for<'a> postgres::types::FromSql<'a> {}
impl<T: rusqlite::types::FromSql + for<'a> postgres::types::FromSql<'a>> Column for T {}

/// One row of an answer.
pub enum Row<'r, 's> {
    Lite(&'r rusqlite::Row<'s>),
    Pg(&'r postgres::Row),
}

impl Row<'_, '_> {
    pub fn get<T: Column>(&self, index: usize) -> Result<T> {
        match self {
            Row::Lite(row) => Ok(row.get(index)?),
            Row::Pg(row) => row.try_get(index).map_err(pg_error),
        }
    }
}

/// Where statements go: a SQLite connection (or transaction), or a PostgreSQL
/// transaction with its prepared statements.
pub enum Sql<'c, 't> {
    Lite(&'c rusqlite::Connection),
    Pg {
        tx: &'c mut postgres::Transaction<'t>,
        prepared: &'c mut Statements,
    },
}

/// PostgreSQL statements prepared on one connection, by their text.
pub type Statements = HashMap<String, postgres::Statement>;

impl Sql<'_, '_> {
    /// Runs a statement: the rows it changed.
    pub fn execute(&mut self, sql: &str, params: &[&dyn Param]) -> Result<u64> {
        match self {
            Sql::Lite(conn) => {
                let params: Vec<&dyn rusqlite::ToSql> =
                    params.iter().map(|p| *p as &dyn rusqlite::ToSql).collect();
                Ok(conn.prepare_cached(sql)?.execute(&params[..])? as u64)
            }
            Sql::Pg { tx, prepared } => {
                let statement = prepare(tx, prepared, sql)?;
                tx.execute(&statement, &pg_params(params)).map_err(pg_error)
            }
        }
    }

    /// Each row of the answer, through `f`.
    pub fn query<T>(
        &mut self,
        sql: &str,
        params: &[&dyn Param],
        mut f: impl FnMut(&Row) -> Result<T>,
    ) -> Result<Vec<T>> {
        match self {
            Sql::Lite(conn) => lite_rows(&mut *conn.prepare_cached(sql)?, params, f),
            Sql::Pg { tx, prepared } => {
                let statement = prepare(tx, prepared, sql)?;
                let rows = tx.query(&statement, &pg_params(params)).map_err(pg_error)?;
                rows.iter().map(|row| f(&Row::Pg(row))).collect()
            }
        }
    }

    /// Runs several statements (a migration).
    pub fn batch(&mut self, sql: &str) -> Result<()> {
        match self {
            Sql::Lite(conn) => Ok(conn.execute_batch(sql)?),
            Sql::Pg { tx, .. } => tx.batch_execute(sql).map_err(pg_error),
        }
    }

    /// The first row of the answer, if any, through `f`.
    pub fn first<T>(
        &mut self,
        sql: &str,
        params: &[&dyn Param],
        f: impl FnMut(&Row) -> Result<T>,
    ) -> Result<Option<T>> {
        Ok(self.query(sql, params, f)?.into_iter().next())
    }
}

fn lite_rows<T>(
    statement: &mut rusqlite::Statement<'_>,
    params: &[&dyn Param],
    mut f: impl FnMut(&Row) -> Result<T>,
) -> Result<Vec<T>> {
    let params: Vec<&dyn rusqlite::ToSql> =
        params.iter().map(|p| *p as &dyn rusqlite::ToSql).collect();
    let mut rows = statement.query(&params[..])?;
    let mut out = Vec::new();
    while let Some(row) = rows.next()? {
        out.push(f(&Row::Lite(row))?);
    }
    Ok(out)
}

fn prepare(
    tx: &mut postgres::Transaction<'_>,
    prepared: &mut Statements,
    sql: &str,
) -> Result<postgres::Statement> {
    if let Some(statement) = prepared.get(sql) {
        return Ok(statement.clone());
    }
    let statement = tx.prepare(&dollar_placeholders(sql)).map_err(pg_error)?;
    prepared.insert(sql.to_string(), statement.clone());
    Ok(statement)
}

fn pg_params<'a>(params: &'a [&'a dyn Param]) -> Vec<&'a (dyn postgres::types::ToSql + Sync)> {
    params
        .iter()
        .map(|p| *p as &(dyn postgres::types::ToSql + Sync))
        .collect()
}

/// A database to write: one connection, a transaction at a time.
pub enum Database {
    Lite(rusqlite::Connection),
    Pg(Box<PgConnection>),
}

impl Database {
    /// Runs `f` in one transaction, committed if it returns Ok.
    pub fn transaction<T: Send>(
        &mut self,
        f: impl FnOnce(&mut Sql) -> Result<T> + Send,
    ) -> Result<T> {
        match self {
            Database::Lite(conn) => {
                let tx = conn.transaction()?;
                let value = f(&mut Sql::Lite(&tx))?;
                tx.commit()?;
                Ok(value)
            }
            Database::Pg(conn) => conn.transaction(f),
        }
    }
}

/// The placeholders of `rows` rows of `columns` values each, numbered on:
/// `(?1, ?2), (?3, ?4)` (an INSERT of many rows, one round trip).
pub fn placeholder_rows(rows: usize, columns: usize) -> String {
    (0..rows)
        .map(|row| {
            let values: Vec<String> = (1..=columns)
                .map(|column| format!("?{}", row * columns + column))
                .collect();
            format!("({})", values.join(", "))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// `?1` → `$1` (the statements here hold no `?` in their literals).
pub fn dollar_placeholders(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '?' && chars.peek().is_some_and(|n| n.is_ascii_digit()) {
            out.push('$');
        } else {
            out.push(c);
        }
    }
    out
}

pub fn pg_error(e: postgres::Error) -> Error {
    match e.as_db_error() {
        Some(db) => Error::Internal(format!("postgres: {}: {}", db.code().code(), db.message())),
        None => Error::Internal(format!("postgres: {e}")),
    }
}

/// Runs `f` on a thread that drives no runtime (the `postgres` client's calls
/// block on a runtime of their own).
pub fn off_runtime<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|scope| {
        scope
            .spawn(f)
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// A PostgreSQL connection and the statements prepared on it.
pub struct PgConnection {
    url: String,
    /// Always Some but while dropped (the client's drop blocks on its runtime,
    /// so it is dropped off ours).
    client: Option<postgres::Client>,
    prepared: Statements,
    /// The last transaction failed: the connection is checked before the next.
    suspect: bool,
}

impl PgConnection {
    /// Connects to `url` (`postgres://user@host:port/db`).
    pub fn connect(url: &str) -> Result<Self> {
        let client =
            off_runtime(|| postgres::Client::connect(url, postgres::NoTls)).map_err(|e| {
                Error::Internal(format!(
                    "cannot connect to PostgreSQL at {}: {e}",
                    redact(url)
                ))
            })?;
        Ok(PgConnection {
            url: url.to_string(),
            client: Some(client),
            prepared: Statements::new(),
            suspect: false,
        })
    }

    /// The database it connects to (with its password).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Runs `f` in one transaction, committed if it returns Ok.
    pub fn transaction<T: Send>(
        &mut self,
        f: impl FnOnce(&mut Sql) -> Result<T> + Send,
    ) -> Result<T> {
        // A connection the server closed (a restart, a network cut) is made
        // again after the transaction that found it so; its statements are
        // prepared again on the new one.
        if self.suspect {
            let client = self.client.as_mut().expect("a connection not dropped");
            let alive = off_runtime(|| client.is_valid(std::time::Duration::from_secs(2)).is_ok());
            if alive {
                self.suspect = false;
            } else {
                *self = Self::connect(&self.url)?;
            }
        }
        let PgConnection {
            client, prepared, ..
        } = self;
        let client = client.as_mut().expect("a connection not dropped");
        let result = off_runtime(move || {
            let mut tx = client.transaction().map_err(pg_error)?;
            let value = f(&mut Sql::Pg {
                tx: &mut tx,
                prepared,
            })?;
            tx.commit().map_err(pg_error)?;
            Ok(value)
        });
        self.suspect = result.is_err();
        result
    }
}

impl Drop for PgConnection {
    fn drop(&mut self) {
        if let Some(client) = self.client.take() {
            off_runtime(move || drop(client));
        }
    }
}

/// `url` without its password, for messages.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let credentials = &url[scheme + 3..at];
            match credentials.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

/// A scratch database for tests and benchmarks: runs `pg_up` (the repository's
/// `scripts/pg-up.sh`, which starts a throwaway PostgreSQL unless one runs),
/// makes the database `name` afresh, and gives its URL.
pub fn scratch_database(pg_up: &std::path::Path, name: &str) -> Result<String> {
    let out = std::process::Command::new("bash")
        .arg(pg_up)
        .output()
        .map_err(|e| Error::Internal(format!("cannot run {}: {e}", pg_up.display())))?;
    if !out.status.success() {
        return Err(Error::Internal(format!(
            "no PostgreSQL (apt-get install postgresql, or run the suite through .ci/run); {} said: {}",
            pg_up.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let base = String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("export SHOAL_TEST_POSTGRES="))
        .ok_or_else(|| Error::Internal("pg-up.sh printed no SHOAL_TEST_POSTGRES".into()))?
        .to_string();
    let statements = format!("DROP DATABASE IF EXISTS {name}; CREATE DATABASE {name}");
    off_runtime(|| {
        let mut client = postgres::Client::connect(&base, postgres::NoTls)?;
        // One statement each: CREATE DATABASE runs outside a transaction.
        for statement in statements.split("; ") {
            client.batch_execute(statement)?;
        }
        Ok::<_, postgres::Error>(())
    })
    .map_err(pg_error)?;
    let (server, _) = base
        .rsplit_once('/')
        .ok_or_else(|| Error::Internal(format!("no database in {}", redact(&base))))?;
    Ok(format!("{server}/{name}"))
}

/// A fresh database of the tests' PostgreSQL: its URL. Without PostgreSQL the
/// test fails, saying so (never skips).
#[cfg(test)]
pub fn test_postgres() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static MADE: AtomicU64 = AtomicU64::new(0);
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let name = format!(
        "shoal_test_{}_{}",
        std::process::id(),
        MADE.fetch_add(1, Ordering::Relaxed)
    );
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/pg-up.sh");
    scratch_database(&script, &name).unwrap_or_else(|e| panic!("this test needs PostgreSQL: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_become_dollars_and_passwords_are_hidden() {
        assert_eq!(
            dollar_placeholders(
                "SELECT a FROM t WHERE b = ?1 AND (?2 IS NULL OR c = ?2) LIMIT ?10"
            ),
            "SELECT a FROM t WHERE b = $1 AND ($2 IS NULL OR c = $2) LIMIT $10"
        );
        assert_eq!(placeholder_rows(2, 3), "(?1, ?2, ?3), (?4, ?5, ?6)");
        assert_eq!(
            redact("postgres://shoal:secret@db:5432/shoal"),
            "postgres://shoal:***@db:5432/shoal"
        );
        assert_eq!(
            redact("postgres://shoal@db/shoal"),
            "postgres://shoal@db/shoal"
        );
    }
}
