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

/// Runs `f`, which blocks, telling a multi-threaded tokio runtime (when called
/// on one of its workers) to move its other tasks elsewhere meanwhile.
pub fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(handle) if handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
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

/// What the `postgres` client reads of `url`, and the TLS it connects with.
/// `sslmode` is libpq's: `disable`, `prefer` (the default: TLS when the server
/// offers it), `require`, `verify-ca`, `verify-full`; whenever TLS is used the
/// server's certificate is checked, against `sslrootcert=FILE` (PEM) or, without
/// it, the Mozilla roots, as `verify-full` does.
fn client_config(url: &str) -> Result<(String, tokio_postgres_rustls::MakeRustlsConnect)> {
    let bad = |why: String| Error::invalid("store", format!("{}: {why}", redact(url)));
    let (url, root_file) = match url::Url::parse(url) {
        Ok(mut parsed) if parsed.scheme().starts_with("postgres") => {
            let mut root_file = None;
            let mut kept = Vec::new();
            for (key, value) in parsed.query_pairs() {
                match (key.as_ref(), value.as_ref()) {
                    ("sslrootcert", file) => root_file = Some(file.to_string()),
                    ("sslmode", "verify-ca" | "verify-full") => {
                        kept.push(("sslmode".to_string(), "require".to_string()))
                    }
                    (key, value) => kept.push((key.to_string(), value.to_string())),
                }
            }
            if kept.is_empty() {
                parsed.set_query(None);
            } else {
                parsed.query_pairs_mut().clear().extend_pairs(kept);
            }
            (parsed.to_string(), root_file)
        }
        // `host=… user=…`, as the client reads it.
        _ => (url.to_string(), None),
    };
    let mut roots = rustls::RootCertStore::empty();
    match &root_file {
        Some(file) => {
            use rustls::pki_types::pem::PemObject;
            let certs = rustls::pki_types::CertificateDer::pem_file_iter(file)
                .and_then(|certs| certs.collect::<std::result::Result<Vec<_>, _>>())
                .map_err(|e| bad(format!("sslrootcert {file}: {e}")))?;
            for cert in certs {
                roots
                    .add(cert)
                    .map_err(|e| bad(format!("sslrootcert {file}: {e}")))?;
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(format!("TLS: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok((url, tokio_postgres_rustls::MakeRustlsConnect::new(config)))
}

/// Whether the TLS handshake failed on the server's certificate (rustls's
/// error, somewhere in the chain of causes).
fn unverified_certificate(e: &postgres::Error) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(error) = cause {
        let rustls_error = error.downcast_ref::<rustls::Error>().or_else(|| {
            error
                .downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        });
        if let Some(rustls::Error::InvalidCertificate(_)) = rustls_error {
            return true;
        }
        cause = error.source();
    }
    false
}

impl PgConnection {
    /// Connects to `url` (`postgres://user@host:port/db`, with libpq's `sslmode`
    /// and `sslrootcert` if TLS is wanted).
    pub fn connect(url: &str) -> Result<Self> {
        let (client_url, tls) = client_config(url)?;
        let client = off_runtime(|| postgres::Client::connect(&client_url, tls)).map_err(|e| {
            let hint = if unverified_certificate(&e) {
                " (give the server's CA with sslrootcert=FILE in the URL, or sslmode=disable on a private network)"
            } else {
                ""
            };
            Error::Internal(format!(
                "cannot connect to PostgreSQL at {}: {e}{hint}",
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

    #[test]
    fn blocking_work_leaves_a_single_worker_free_for_other_tasks() {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_time()
            .build()
            .expect("runtime");
        let ticks = runtime.block_on(async {
            let ticks = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
            let counter = ticks.clone();
            let ticking = tokio::spawn(async move {
                loop {
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            });
            tokio::spawn(async {
                blocking(|| std::thread::sleep(std::time::Duration::from_millis(300)))
            })
            .await
            .expect("blocking task");
            ticking.abort();
            ticks.load(std::sync::atomic::Ordering::Relaxed)
        });
        assert!(ticks >= 10, "the other task ran {ticks} times in 300 ms");
        // Outside a multi-threaded runtime it simply runs.
        let current = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        assert_eq!(current.block_on(async { blocking(|| 7) }), 7);
        assert_eq!(blocking(|| 8), 8);
    }

    /// A PostgreSQL of its own, serving TLS, stopped and removed when dropped.
    struct TlsServer {
        dir: String,
        url: String,
        ca: std::path::PathBuf,
        _certs: tempfile::TempDir,
    }

    impl TlsServer {
        fn start() -> Self {
            let certs = tempfile::tempdir().expect("dir");
            let files = crate::tls::self_signed(
                certs.path(),
                &["localhost".to_string(), "127.0.0.1".to_string()],
            )
            .expect("certificates");
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("a free port")
                .port();
            let dir = format!("/tmp/shoal-pg-tls-{}", std::process::id());
            let script =
                std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/pg-up.sh");
            let out = std::process::Command::new("bash")
                .arg(&script)
                .arg(&dir)
                .env("SHOAL_PG_PORT", port.to_string())
                .env("SHOAL_PG_TLS_DIR", certs.path())
                .output()
                .expect("bash");
            assert!(
                out.status.success(),
                "this test needs PostgreSQL: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            TlsServer {
                dir,
                url: format!("postgres://postgres@127.0.0.1:{port}/postgres"),
                ca: files.ca.expect("a CA"),
                _certs: certs,
            }
        }
    }

    impl Drop for TlsServer {
        fn drop(&mut self) {
            let pid = std::fs::read_to_string(format!("{}/data/postmaster.pid", self.dir))
                .unwrap_or_default();
            if let Some(pid) = pid.lines().next() {
                let _ = std::process::Command::new("kill")
                    .args(["-INT", pid])
                    .status();
                std::thread::sleep(std::time::Duration::from_millis(500));
            }
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    /// Whether the session runs over TLS.
    fn over_tls(url: &str) -> Result<bool> {
        let mut conn = PgConnection::connect(url)?;
        conn.transaction(|sql| {
            sql.first(
                "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
                &[],
                |r| r.get::<bool>(0),
            )
            .map(|ssl| ssl == Some(true))
        })
    }

    #[test]
    fn tls_is_checked_against_sslrootcert_and_an_unknown_ca_is_refused() {
        let server = TlsServer::start();
        let base = &server.url;
        let ca = server.ca.display();
        for checked in ["verify-full", "verify-ca", "require"] {
            let url = format!("{base}?sslmode={checked}&sslrootcert={ca}");
            assert!(over_tls(&url).expect(checked), "{checked}");
        }
        assert!(!over_tls(&format!("{base}?sslmode=disable")).expect("plain"));
        // Without the CA the server's certificate is unknown: refused, saying
        // what to do (libpq's `prefer` and `require` would not check it).
        for unchecked in [format!("{base}?sslmode=require"), base.clone()] {
            let err = over_tls(&unchecked).expect_err("an unknown CA");
            assert!(err.to_string().contains("sslrootcert=FILE"), "{err}");
        }
        let err =
            over_tls(&format!("{base}?sslrootcert=/nonexistent/ca.pem")).expect_err("no such file");
        assert!(err.to_string().contains("/nonexistent/ca.pem"), "{err}");
    }
}
