//! Durable state behind the `Store` trait: SQLite (bundled) with schema migrations.
//! The control loop writes one transaction per batch of changes, before any reply
//! or launch leaves the coordinator (durable before ack). The API reads history
//! (finished jobs, logs, result rows) through a `Reader` of its own: read-only
//! connections that never go through the loop.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rusqlite::Connection;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::data::{DataAsset, Datastore};
use crate::db::{Database, Param, PgConnection, Sql};
use crate::governance::Quotas;
use crate::model::{Cluster, Component, Environment, Identity, Job, JobStatus, Millis, Node};
use crate::parallel::{BatchStatus, Cut, MiniBatch};
use crate::{Error, Result};

/// Everything the coordinator needs to pick up where it left off.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub clusters: Vec<Cluster>,
    pub nodes: Vec<Node>,
    pub jobs: Vec<Job>,
    pub next_job_seq: u64,
    pub next_node_seq: u64,
    /// Quotas set at run time (`shoal quota set`); None: the config's.
    pub quotas: Option<Quotas>,
    /// Parallel jobs' mini-batches (without items and rows), by job.
    pub mini_batches: Vec<(String, MiniBatch)>,
    /// User-assigned managed identities.
    pub identities: Vec<Identity>,
    /// Ended jobs kept in the store, by status (only live and recent ones are loaded).
    pub ended_counts: BTreeMap<JobStatus, u64>,
    pub datastores: Vec<Datastore>,
    pub data_assets: Vec<DataAsset>,
    pub environments: Vec<Environment>,
    pub components: Vec<Component>,
    /// `shoal configure --defaults` (compute=NAME, ...).
    pub defaults: BTreeMap<String, String>,
}

/// Live jobs, and this many of the most recently ended, are loaded at start.
pub const RECENT_JOBS: usize = 5_000;

#[derive(Clone, Debug)]
pub struct NewLog {
    pub job_id: String,
    pub attempt_id: String,
    pub instance: u32,
    pub stream: String,
    pub data: Vec<u8>,
}

#[derive(Clone, Debug)]
pub struct StoredLog {
    pub seq: i64,
    pub job_id: String,
    pub attempt_id: String,
    pub instance: u32,
    pub stream: String,
    pub data: Vec<u8>,
}

/// One group commit: every change of one control-loop batch.
#[derive(Debug, Default)]
pub struct Batch {
    pub clusters: Vec<Cluster>,
    pub deleted_clusters: Vec<String>,
    pub nodes: Vec<Node>,
    pub deleted_nodes: Vec<String>,
    pub jobs: Vec<Job>,
    pub logs: Vec<NewLog>,
    pub next_job_seq: Option<u64>,
    pub next_node_seq: Option<u64>,
    pub quotas: Option<Quotas>,
    /// A new parallel job's mini-batches, as cut.
    pub new_mini_batches: Vec<(String, Vec<Cut>)>,
    /// Mini-batch states that changed.
    pub mini_batches: Vec<(String, MiniBatch)>,
    /// Result rows of mini-batches done in this batch: (job, index, rows).
    pub mini_batch_rows: Vec<(String, u32, Vec<u8>)>,
    /// User-assigned identities made in this batch.
    pub identities: Vec<Identity>,
    /// Ended jobs to delete, with their logs and rows (`shoal job delete`).
    pub delete_jobs: Vec<String>,
    /// Retention: delete jobs that ended before this (a bounded number per batch).
    pub purge_ended_before: Option<Millis>,
    pub datastores: Vec<Datastore>,
    pub data_assets: Vec<DataAsset>,
    pub environments: Vec<Environment>,
    pub components: Vec<Component>,
    pub defaults: Option<BTreeMap<String, String>>,
}

/// Jobs deleted per batch by retention at most (the rest go in later batches).
pub const PURGE_PER_BATCH: usize = 1_000;

/// A deleted job: what of it lives outside the store (its files).
#[derive(Clone, Debug, PartialEq)]
pub struct Purged {
    pub id: String,
    pub status: JobStatus,
    /// Its code snapshots (a pipeline's: each step's).
    pub code_paths: Vec<String>,
    /// Inputs uploaded with it, kept by the coordinator.
    pub inputs: Vec<String>,
    pub attempts: Vec<String>,
}

/// What a commit did beyond writing.
#[derive(Debug, Default)]
pub struct Committed {
    /// The sequence numbers given to `batch.logs`, in order.
    pub log_seqs: Vec<i64>,
    /// Jobs deleted (asked for, or past retention).
    pub purged: Vec<Purged>,
}

impl Batch {
    pub fn is_empty(&self) -> bool {
        self.clusters.is_empty()
            && self.deleted_clusters.is_empty()
            && self.nodes.is_empty()
            && self.deleted_nodes.is_empty()
            && self.jobs.is_empty()
            && self.logs.is_empty()
            && self.next_job_seq.is_none()
            && self.next_node_seq.is_none()
            && self.quotas.is_none()
            && self.new_mini_batches.is_empty()
            && self.mini_batches.is_empty()
            && self.mini_batch_rows.is_empty()
            && self.identities.is_empty()
            && self.delete_jobs.is_empty()
            && self.purge_ended_before.is_none()
            && self.datastores.is_empty()
            && self.data_assets.is_empty()
            && self.environments.is_empty()
            && self.components.is_empty()
            && self.defaults.is_none()
    }
}

pub trait Store: Send + 'static {
    /// Live jobs and the `RECENT_JOBS` most recently ended, with everything else.
    fn load(&mut self) -> Result<Snapshot>;
    /// Writes the whole batch in one transaction.
    fn commit(&mut self, batch: &Batch) -> Result<Committed>;
}

/// Each entry moves the schema one version up; never edit a released one.
const MIGRATIONS: &[&str] = &[
    // 1: the first schema
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
     CREATE TABLE clusters (name TEXT PRIMARY KEY, body TEXT NOT NULL);
     CREATE TABLE nodes (id TEXT PRIMARY KEY, cluster TEXT NOT NULL, body TEXT NOT NULL);
     CREATE TABLE jobs (id TEXT PRIMARY KEY, seq INTEGER NOT NULL, cluster TEXT NOT NULL,
                        status TEXT NOT NULL, body TEXT NOT NULL);
     CREATE INDEX jobs_by_seq ON jobs (seq);
     CREATE TABLE logs (seq INTEGER PRIMARY KEY AUTOINCREMENT, job_id TEXT NOT NULL,
                        attempt_id TEXT NOT NULL, instance INTEGER NOT NULL,
                        stream TEXT NOT NULL, data BLOB NOT NULL);
     CREATE INDEX logs_by_job ON logs (job_id, seq);",
    // 2: settings changed at run time (quotas)
    "CREATE TABLE settings (key TEXT PRIMARY KEY, body TEXT NOT NULL);",
    // 3: parallel jobs' mini-batches: items in at submit, rows out with the result
    "CREATE TABLE mini_batches (job_id TEXT NOT NULL, idx INTEGER NOT NULL,
                                item_count INTEGER NOT NULL, status TEXT NOT NULL,
                                executions INTEGER NOT NULL, failures INTEGER NOT NULL,
                                lease TEXT, node TEXT, deadline INTEGER, message TEXT NOT NULL,
                                items BLOB NOT NULL, rows BLOB,
                                PRIMARY KEY (job_id, idx));",
    // 4: user-assigned managed identities (a cluster's assignments live in its row)
    "CREATE TABLE identities (name TEXT PRIMARY KEY, body TEXT NOT NULL);",
    // 5: when a job ended, for retention and for loading only recent history
    "ALTER TABLE jobs ADD COLUMN ended_at INTEGER NOT NULL DEFAULT 0;
     UPDATE jobs SET ended_at = COALESCE(json_extract(body, '$.ended_at'), 0)
      WHERE status IN ('completed', 'failed', 'canceled', 'timed_out');
     CREATE INDEX jobs_by_end ON jobs (ended_at) WHERE ended_at > 0;",
    // 6: datastores, data assets and environments, each a versioned body
    "CREATE TABLE datastores (name TEXT PRIMARY KEY, body TEXT NOT NULL);
     CREATE TABLE data_assets (name TEXT NOT NULL, version TEXT NOT NULL, body TEXT NOT NULL,
                               PRIMARY KEY (name, version));
     CREATE TABLE environments (name TEXT NOT NULL, version TEXT NOT NULL, body TEXT NOT NULL,
                                PRIMARY KEY (name, version));",
    // 7: a task's array, so that lists show an array once and its tasks on asking
    "ALTER TABLE jobs ADD COLUMN array_seq INTEGER;
     CREATE INDEX jobs_by_array ON jobs (array_seq, seq) WHERE array_seq IS NOT NULL;",
    // 8: components, each a versioned body
    "CREATE TABLE components (name TEXT NOT NULL, version TEXT NOT NULL, body TEXT NOT NULL,
                              PRIMARY KEY (name, version));",
    // 9: items a mini-batch's run gave no result for (run_function's error_threshold)
    "ALTER TABLE mini_batches ADD COLUMN failed_items INTEGER NOT NULL DEFAULT 0;",
];

/// The same schema for PostgreSQL, from its first version on: `BIGINT`
/// integers, `BYTEA` blobs. A change of the tables both have is one more entry
/// in both lists (each database migrates from where it stands).
const PG_MIGRATIONS: &[&str] = &[
    // 1: SQLite's schema at its version 9
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value BIGINT NOT NULL);
     CREATE TABLE clusters (name TEXT PRIMARY KEY, body TEXT NOT NULL);
     CREATE TABLE nodes (id TEXT PRIMARY KEY, cluster TEXT NOT NULL, body TEXT NOT NULL);
     CREATE TABLE jobs (id TEXT PRIMARY KEY, seq BIGINT NOT NULL, cluster TEXT NOT NULL,
                        status TEXT NOT NULL, body TEXT NOT NULL,
                        ended_at BIGINT NOT NULL DEFAULT 0, array_seq BIGINT);
     CREATE INDEX jobs_by_seq ON jobs (seq);
     CREATE INDEX jobs_by_end ON jobs (ended_at) WHERE ended_at > 0;
     CREATE INDEX jobs_by_array ON jobs (array_seq, seq) WHERE array_seq IS NOT NULL;
     CREATE TABLE logs (seq BIGSERIAL PRIMARY KEY, job_id TEXT NOT NULL,
                        attempt_id TEXT NOT NULL, instance BIGINT NOT NULL,
                        stream TEXT NOT NULL, data BYTEA NOT NULL);
     CREATE INDEX logs_by_job ON logs (job_id, seq);
     CREATE TABLE settings (key TEXT PRIMARY KEY, body TEXT NOT NULL);
     CREATE TABLE mini_batches (job_id TEXT NOT NULL, idx BIGINT NOT NULL,
                                item_count BIGINT NOT NULL, status TEXT NOT NULL,
                                executions BIGINT NOT NULL, failures BIGINT NOT NULL,
                                lease TEXT, node TEXT, deadline BIGINT, message TEXT NOT NULL,
                                items BYTEA NOT NULL, rows BYTEA,
                                failed_items BIGINT NOT NULL DEFAULT 0,
                                PRIMARY KEY (job_id, idx));
     CREATE TABLE identities (name TEXT PRIMARY KEY, body TEXT NOT NULL);
     CREATE TABLE datastores (name TEXT PRIMARY KEY, body TEXT NOT NULL);
     CREATE TABLE data_assets (name TEXT NOT NULL, version TEXT NOT NULL, body TEXT NOT NULL,
                               PRIMARY KEY (name, version));
     CREATE TABLE environments (name TEXT NOT NULL, version TEXT NOT NULL, body TEXT NOT NULL,
                                PRIMARY KEY (name, version));
     CREATE TABLE components (name TEXT NOT NULL, version TEXT NOT NULL, body TEXT NOT NULL,
                              PRIMARY KEY (name, version));",
    // 2: who leads (`leader.rs`; SQLite has one coordinator by construction)
    "CREATE TABLE shoal_leader (id BIGINT PRIMARY KEY, holder TEXT NOT NULL,
                                until_ms BIGINT NOT NULL);",
    // 3: the id and signing key every coordinator of the database uses
    // (`identity::shared`; SQLite's are files in the data dir)
    "CREATE TABLE shoal_identity (id BIGINT PRIMARY KEY, owner TEXT NOT NULL,
                                  signing_key BYTEA NOT NULL);",
];

/// Statuses of ended jobs, as stored.
macro_rules! ended {
    () => {
        "('completed', 'failed', 'canceled', 'timed_out')"
    };
}

/// The coordinator's durable state, in SQLite (the embedded default) or
/// PostgreSQL: the same statements, the same semantics.
pub struct SqlStore {
    db: Database,
    /// Leading a shared PostgreSQL database: each commit renews the lease,
    /// and fails once it is lost.
    lease: Option<crate::leader::Lease>,
    /// A store of tests lives in a folder of its own, removed with it.
    _scratch: Option<tempfile::TempDir>,
}

impl SqlStore {
    pub fn open(path: &Path) -> Result<Self> {
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        // FULL: a committed batch survives power loss, not only a killed process.
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        Self::migrate(conn, None)
    }

    /// A throwaway store (a file in a temporary folder, not synced), for tests of
    /// the control loop; readers can open it like a real one.
    pub fn in_memory() -> Result<Self> {
        let scratch = tempfile::Builder::new()
            .prefix("shoal-store-")
            .tempdir()
            .map_err(|e| Error::Internal(format!("temporary store: {e}")))?;
        let path = scratch.path().join("shoal.db");
        let conn = Connection::open(&path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "OFF")?;
        Self::migrate(conn, Some(scratch))
    }

    /// The store in a PostgreSQL database (`postgres://user@host:port/db`),
    /// migrated to this shoal's schema first.
    pub fn connect_postgres(url: &str) -> Result<Self> {
        let mut conn = PgConnection::connect(url)?;
        let newest = PG_MIGRATIONS.len() as i64;
        conn.transaction(|sql| {
            // Two coordinators starting on one database migrate one at a time.
            sql.execute("SELECT pg_advisory_xact_lock(7070)", &[])?;
            sql.execute(
                "CREATE TABLE IF NOT EXISTS shoal_schema (version BIGINT NOT NULL)",
                &[],
            )?;
            let version = sql
                .first("SELECT version FROM shoal_schema", &[], |r| r.get::<i64>(0))?
                .unwrap_or(0);
            if version > newest {
                return Err(Error::Internal(format!(
                    "the database has schema version {version}, newer than this shoal ({newest}); use a newer shoal"
                )));
            }
            for migration in &PG_MIGRATIONS[version as usize..] {
                sql.batch(migration)?;
            }
            sql.execute("DELETE FROM shoal_schema", &[])?;
            sql.execute("INSERT INTO shoal_schema (version) VALUES (?1)", &[&newest])?;
            Ok(())
        })?;
        Ok(SqlStore {
            db: Database::Pg(Box::new(conn)),
            _scratch: None,
            lease: None,
        })
    }

    /// Commits only while `lease` holds (a PostgreSQL store shared by a leader
    /// and its standbys).
    pub fn lead(&mut self, lease: crate::leader::Lease) {
        self.lease = Some(lease);
    }

    /// Read-only connections for the API (history, logs, rows).
    pub fn reader(&self) -> Result<Reader> {
        Reader::of(&self.db)
    }

    fn migrate(mut conn: Connection, scratch: Option<tempfile::TempDir>) -> Result<Self> {
        let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        let version = usize::try_from(version).unwrap_or(0);
        if version > MIGRATIONS.len() {
            return Err(Error::Internal(format!(
                "the database has schema version {version}, newer than this shoal ({}); use a newer shoal",
                MIGRATIONS.len()
            )));
        }
        for (index, sql) in MIGRATIONS.iter().enumerate().skip(version) {
            let tx = conn.transaction()?;
            tx.execute_batch(sql)?;
            tx.pragma_update(None, "user_version", (index + 1) as i64)?;
            tx.commit()?;
        }
        // Room for every statement, the job upserts of each size included.
        conn.set_prepared_statement_cache_capacity(96);
        Ok(SqlStore {
            db: Database::Lite(conn),
            _scratch: scratch,
            lease: None,
        })
    }

    /// Runs `f` in one transaction, committed if it returns Ok.
    fn transaction<T: Send>(&mut self, f: impl FnOnce(&mut Sql) -> Result<T> + Send) -> Result<T> {
        self.db.transaction(f)
    }
}

fn decode<T: DeserializeOwned>(table: &str, key: &str, body: &str) -> Result<T> {
    serde_json::from_str(body)
        .map_err(|e| Error::Internal(format!("stored {table} row `{key}` is unreadable: {e}")))
}

fn encode<T: Serialize>(value: &T) -> Result<String> {
    serde_json::to_string(value).map_err(|e| Error::Internal(format!("encoding: {e}")))
}

/// Rows of (key, body), decoded.
fn load_table<T: DeserializeOwned>(
    sql: &mut Sql,
    query: &'static str,
    params: &[&dyn Param],
    table: &str,
) -> Result<Vec<T>> {
    sql.query(query, params, |r| {
        let key: String = r.get(0)?;
        let body: String = r.get(1)?;
        decode(table, &key, &body)
    })
}

fn setting<T: DeserializeOwned>(sql: &mut Sql, key: &'static str) -> Result<Option<T>> {
    let body = sql.first("SELECT body FROM settings WHERE key = ?1", &[&key], |r| {
        r.get::<String>(0)
    })?;
    body.map(|b| decode("settings", key, &b)).transpose()
}

fn meta(sql: &mut Sql, key: &'static str) -> Result<u64> {
    let value = sql.first("SELECT value FROM meta WHERE key = ?1", &[&key], |r| {
        r.get::<i64>(0)
    })?;
    Ok(value.unwrap_or(0) as u64)
}

fn load(sql: &mut Sql) -> Result<Snapshot> {
    Ok(Snapshot {
        clusters: load_table(sql, "SELECT name, body FROM clusters", &[], "cluster")?,
        nodes: load_table(sql, "SELECT id, body FROM nodes", &[], "node")?,
        identities: load_table(
            sql,
            "SELECT name, body FROM identities ORDER BY name",
            &[],
            "identity",
        )?,
        jobs: load_table(
            sql,
            concat!(
                "SELECT id, body FROM jobs WHERE status NOT IN ",
                ended!(),
                " UNION ALL
                 SELECT id, body FROM (SELECT id, body FROM jobs WHERE status IN ",
                ended!(),
                " ORDER BY ended_at DESC LIMIT ?1) AS recent"
            ),
            &[&(RECENT_JOBS as i64)],
            "job",
        )?,
        datastores: load_table(sql, "SELECT name, body FROM datastores", &[], "datastore")?,
        data_assets: load_table(
            sql,
            "SELECT name || ':' || version, body FROM data_assets",
            &[],
            "data asset",
        )?,
        environments: load_table(
            sql,
            "SELECT name || ':' || version, body FROM environments",
            &[],
            "environment",
        )?,
        components: load_table(
            sql,
            "SELECT name || ':' || version, body FROM components",
            &[],
            "component",
        )?,
        defaults: setting(sql, "defaults")?.unwrap_or_default(),
        ended_counts: {
            let rows = sql.query(
                concat!(
                    "SELECT status, count(*) FROM jobs WHERE status IN ",
                    ended!(),
                    " GROUP BY status"
                ),
                &[],
                |r| Ok((r.get::<String>(0)?, r.get::<i64>(1)?)),
            )?;
            rows.into_iter()
                .filter_map(|(status, count)| Some((JobStatus::parse(&status)?, count as u64)))
                .collect()
        },
        next_job_seq: meta(sql, "next_job_seq")?.max(1),
        next_node_seq: meta(sql, "next_node_seq")?.max(1),
        quotas: setting(sql, "quotas")?,
        mini_batches: sql.query(
            concat!(
                "SELECT job_id, idx, item_count, status, executions, failures, lease, node,
                        deadline, message, failed_items FROM mini_batches
                 WHERE job_id IN (SELECT id FROM jobs WHERE status NOT IN ",
                ended!(),
                ") ORDER BY job_id, idx"
            ),
            &[],
            |r| {
                let status: String = r.get(3)?;
                Ok((
                    r.get::<String>(0)?,
                    MiniBatch {
                        index: r.get::<i64>(1)? as u32,
                        items: r.get::<i64>(2)? as u64,
                        status: BatchStatus::parse(&status).unwrap_or(BatchStatus::Pending),
                        executions: r.get::<i64>(4)? as u32,
                        failures: r.get::<i64>(5)? as u32,
                        lease: r.get(6)?,
                        node: r.get(7)?,
                        deadline: r.get(8)?,
                        message: r.get(9)?,
                        failed_items: r.get::<i64>(10)? as u64,
                    },
                ))
            },
        )?,
    })
}

/// Puts (key, body) rows: one statement per table, the same for both databases.
fn put(sql: &mut Sql, statement: &'static str, key: &str, body: &str) -> Result<()> {
    sql.execute(statement, &[&key, &body])?;
    Ok(())
}

/// Rows per INSERT of many rows: one round trip on PostgreSQL.
const ROWS_PER_STATEMENT: usize = 32;

/// `head` `VALUES` n rows of `columns` placeholders `tail`, for n in
/// 1..=ROWS_PER_STATEMENT, made once into `made`.
fn rows_statement(
    made: &'static std::sync::OnceLock<Vec<String>>,
    head: &str,
    columns: usize,
    tail: &str,
    rows: usize,
) -> &'static str {
    let all = made.get_or_init(|| {
        (1..=ROWS_PER_STATEMENT)
            .map(|n| {
                format!(
                    "{head} VALUES {} {tail}",
                    crate::db::placeholder_rows(n, columns)
                )
            })
            .collect()
    });
    &all[rows - 1]
}

/// Each key's last item, in order: one statement may not change a row twice,
/// and the last state put wins.
fn last_of<T>(items: &[T], key: impl Fn(&T) -> &str) -> Vec<&T> {
    let mut last = std::collections::HashMap::with_capacity(items.len());
    for (at, item) in items.iter().enumerate() {
        last.insert(key(item), at);
    }
    items
        .iter()
        .enumerate()
        .filter(|(at, item)| last.get(key(item)) == Some(at))
        .map(|(_, item)| item)
        .collect()
}

/// Runs `statement(n)` over `rows`, n rows at a time.
fn put_rows<const N: usize>(
    sql: &mut Sql,
    statement: fn(usize) -> &'static str,
    rows: &[[&dyn Param; N]],
) -> Result<()> {
    for chunk in rows.chunks(ROWS_PER_STATEMENT) {
        let params: Vec<&dyn Param> = chunk.iter().flatten().copied().collect();
        sql.execute(statement(chunk.len()), &params)?;
    }
    Ok(())
}

fn jobs_upsert(rows: usize) -> &'static str {
    static MADE: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    rows_statement(
        &MADE,
        "INSERT INTO jobs (id, seq, cluster, status, body, ended_at, array_seq)",
        7,
        // A job's seq, cluster and array never change once it is stored: an
        // update sets only what does, and SQLite then leaves the indexes on seq
        // and on the array alone (it maintains every index on a column SET names).
        "ON CONFLICT (id) DO UPDATE SET status = excluded.status, body = excluded.body,
             ended_at = excluded.ended_at",
        rows,
    )
}

fn nodes_upsert(rows: usize) -> &'static str {
    static MADE: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    rows_statement(
        &MADE,
        "INSERT INTO nodes (id, cluster, body)",
        3,
        "ON CONFLICT (id) DO UPDATE SET cluster = excluded.cluster, body = excluded.body",
        rows,
    )
}

/// Puts jobs, many per statement (the last of a job put twice wins).
fn put_jobs(sql: &mut Sql, jobs: &[Job]) -> Result<()> {
    let jobs = last_of(jobs, |job| &job.id);
    let mut owned = Vec::with_capacity(jobs.len());
    for job in &jobs {
        let ended_at = if job.status.is_final() {
            job.ended_at
        } else {
            0
        };
        owned.push((
            job.id.as_str(),
            job.spec.cluster.as_str(),
            job.seq as i64,
            job.status.as_str(),
            encode(job)?,
            ended_at,
            job.parent_seq().map(|seq| seq as i64),
        ));
    }
    let rows: Vec<[&dyn Param; 7]> = owned
        .iter()
        .map(|(id, cluster, seq, status, body, ended_at, array_seq)| {
            [
                id as &dyn Param,
                seq,
                cluster,
                status,
                body,
                ended_at,
                array_seq,
            ]
        })
        .collect();
    put_rows(sql, jobs_upsert, &rows)
}

/// Puts nodes, many per statement (the last of a node put twice wins).
fn put_nodes(sql: &mut Sql, nodes: &[Node]) -> Result<()> {
    let nodes = last_of(nodes, |node| &node.id);
    let bodies = nodes.iter().map(encode).collect::<Result<Vec<_>>>()?;
    let rows: Vec<[&dyn Param; 3]> = nodes
        .iter()
        .zip(&bodies)
        .map(|(node, body)| [&node.id as &dyn Param, &node.cluster, body])
        .collect();
    put_rows(sql, nodes_upsert, &rows)
}

/// Puts (name, version, body) rows.
fn put_versioned<T: Serialize>(
    sql: &mut Sql,
    statement: &'static str,
    items: &[T],
    key: impl Fn(&T) -> (&String, &String),
) -> Result<()> {
    for item in items {
        let (name, version) = key(item);
        sql.execute(statement, &[name, version, &encode(item)?])?;
    }
    Ok(())
}

fn commit(sql: &mut Sql, batch: &Batch) -> Result<Committed> {
    let mut log_seqs = Vec::with_capacity(batch.logs.len());
    let mut purged = Vec::new();
    for cluster in &batch.clusters {
        put(
            sql,
            "INSERT INTO clusters (name, body) VALUES (?1, ?2)
             ON CONFLICT (name) DO UPDATE SET body = excluded.body",
            &cluster.spec.name,
            &encode(cluster)?,
        )?;
    }
    for name in &batch.deleted_clusters {
        sql.execute("DELETE FROM clusters WHERE name = ?1", &[name])?;
    }
    put_nodes(sql, &batch.nodes)?;
    for id in &batch.deleted_nodes {
        sql.execute("DELETE FROM nodes WHERE id = ?1", &[id])?;
    }
    put_jobs(sql, &batch.jobs)?;
    let mut doomed: Vec<String> = batch.delete_jobs.clone();
    if let Some(before) = batch.purge_ended_before {
        doomed.extend(sql.query(
            concat!(
                "SELECT id FROM jobs WHERE ended_at > 0 AND ended_at < ?1 AND status IN ",
                ended!(),
                " LIMIT ?2"
            ),
            &[&before, &(PURGE_PER_BATCH as i64)],
            |r| r.get::<String>(0),
        )?);
    }
    for id in doomed {
        // An array goes with its tasks, a sweep with its trials, a pipeline
        // with its steps (and a sweep step with its trials).
        let mut family = vec![id];
        let mut at = 0;
        while at < family.len() {
            if let Some(seq) = crate::control::job_seq(&family[at]) {
                let children = sql.query(
                    "SELECT id FROM jobs WHERE array_seq = ?1",
                    &[&(seq as i64)],
                    |r| r.get::<String>(0),
                )?;
                family.extend(children);
            }
            at += 1;
        }
        for id in family.iter().rev() {
            if let Some(gone) = delete_job(sql, id)? {
                purged.push(gone);
            }
        }
    }
    for log in &batch.logs {
        let seq = sql.query(
            "INSERT INTO logs (job_id, attempt_id, instance, stream, data)
             VALUES (?1, ?2, ?3, ?4, ?5) RETURNING seq",
            &[
                &log.job_id,
                &log.attempt_id,
                &i64::from(log.instance),
                &log.stream,
                &log.data,
            ],
            |r| r.get::<i64>(0),
        )?;
        log_seqs.extend(seq);
    }
    let put_meta = "INSERT INTO meta (key, value) VALUES (?1, ?2)
                    ON CONFLICT (key) DO UPDATE SET value = excluded.value";
    if let Some(seq) = batch.next_job_seq {
        sql.execute(put_meta, &[&"next_job_seq", &(seq as i64)])?;
    }
    if let Some(seq) = batch.next_node_seq {
        sql.execute(put_meta, &[&"next_node_seq", &(seq as i64)])?;
    }
    for (job_id, cuts) in &batch.new_mini_batches {
        for (index, cut) in cuts.iter().enumerate() {
            sql.execute(
                "INSERT INTO mini_batches (job_id, idx, item_count, status, executions, failures,
                                           message, items)
                 VALUES (?1, ?2, ?3, 'pending', 0, 0, '', ?4)",
                &[job_id, &(index as i64), &(cut.count as i64), &cut.items],
            )?;
        }
    }
    for (job_id, b) in &batch.mini_batches {
        sql.execute(
            "UPDATE mini_batches SET status = ?3, executions = ?4, failures = ?5, lease = ?6,
                    node = ?7, deadline = ?8, message = ?9, failed_items = ?10
             WHERE job_id = ?1 AND idx = ?2",
            &[
                job_id,
                &i64::from(b.index),
                &b.status.as_str(),
                &i64::from(b.executions),
                &i64::from(b.failures),
                &b.lease,
                &b.node,
                &b.deadline,
                &b.message,
                &(b.failed_items as i64),
            ],
        )?;
    }
    for (job_id, index, rows) in &batch.mini_batch_rows {
        sql.execute(
            "UPDATE mini_batches SET rows = ?3 WHERE job_id = ?1 AND idx = ?2",
            &[job_id, &i64::from(*index), rows],
        )?;
    }
    for identity in &batch.identities {
        put(
            sql,
            "INSERT INTO identities (name, body) VALUES (?1, ?2)
             ON CONFLICT (name) DO UPDATE SET body = excluded.body",
            &identity.name,
            &encode(identity)?,
        )?;
    }
    for datastore in &batch.datastores {
        put(
            sql,
            "INSERT INTO datastores (name, body) VALUES (?1, ?2)
             ON CONFLICT (name) DO UPDATE SET body = excluded.body",
            &datastore.name,
            &encode(datastore)?,
        )?;
    }
    put_versioned(
        sql,
        "INSERT INTO data_assets (name, version, body) VALUES (?1, ?2, ?3)
         ON CONFLICT (name, version) DO UPDATE SET body = excluded.body",
        &batch.data_assets,
        |a| (&a.name, &a.version),
    )?;
    put_versioned(
        sql,
        "INSERT INTO environments (name, version, body) VALUES (?1, ?2, ?3)
         ON CONFLICT (name, version) DO UPDATE SET body = excluded.body",
        &batch.environments,
        |e| (&e.name, &e.version),
    )?;
    put_versioned(
        sql,
        "INSERT INTO components (name, version, body) VALUES (?1, ?2, ?3)
         ON CONFLICT (name, version) DO UPDATE SET body = excluded.body",
        &batch.components,
        |c| (&c.name, &c.version),
    )?;
    let put_setting = "INSERT INTO settings (key, body) VALUES (?1, ?2)
                       ON CONFLICT (key) DO UPDATE SET body = excluded.body";
    if let Some(defaults) = &batch.defaults {
        put(sql, put_setting, "defaults", &encode(defaults)?)?;
    }
    if let Some(quotas) = &batch.quotas {
        put(sql, put_setting, "quotas", &encode(quotas)?)?;
    }
    Ok(Committed { log_seqs, purged })
}

impl Store for SqlStore {
    fn load(&mut self) -> Result<Snapshot> {
        self.transaction(load)
    }

    fn commit(&mut self, batch: &Batch) -> Result<Committed> {
        if batch.is_empty() {
            return Ok(Committed::default());
        }
        let lease = self.lease.clone();
        self.transaction(|sql| {
            if let Some(lease) = &lease {
                lease.renew(sql)?;
            }
            commit(sql, batch)
        })
    }
}

/// Deletes one job with its logs and mini-batches; what of it lives in files.
fn delete_job(sql: &mut Sql, id: &str) -> Result<Option<Purged>> {
    let body = sql.first("SELECT body FROM jobs WHERE id = ?1", &[&id], |r| {
        r.get::<String>(0)
    })?;
    let Some(body) = body else {
        return Ok(None);
    };
    let job: Job = decode("job", id, &body)?;
    sql.execute("DELETE FROM logs WHERE job_id = ?1", &[&id])?;
    sql.execute("DELETE FROM mini_batches WHERE job_id = ?1", &[&id])?;
    sql.execute("DELETE FROM jobs WHERE id = ?1", &[&id])?;
    // A parallel step never made kept its mini-batches under the job it would be.
    for step in job.pipeline.iter().flat_map(|p| &p.steps) {
        if let Some(parallel) = step
            .parallel
            .as_ref()
            .filter(|p| step.seq != Some(p.job_seq))
        {
            sql.execute(
                "DELETE FROM mini_batches WHERE job_id = ?1",
                &[&crate::control::job_id(parallel.job_seq)],
            )?;
        }
    }
    // A task's code and inputs are its array's (shared by every task), and a
    // trial's its sweep's: they go with the record.
    // A pipeline's steps' files are its own: its record holds every step's spec.
    let owns_files = job.parent_seq().is_none();
    let steps = job
        .pipeline
        .as_deref()
        .map(|p| &p.steps[..])
        .unwrap_or_default();
    let specs = || std::iter::once(&job.spec).chain(steps.iter().map(|s| &s.spec));
    let inputs = specs()
        .flat_map(|spec| spec.extras.inputs.values())
        .filter(|_| owns_files)
        .filter_map(|input| match &input.source {
            crate::data::DataSource::Stored { path, .. } if !path.is_empty() => Some(path.clone()),
            _ => None,
        })
        .collect();
    let code_paths = specs()
        .filter(|_| owns_files)
        .filter_map(|spec| spec.code_path.clone())
        .collect();
    Ok(Some(Purged {
        id: job.id.to_string(),
        status: job.status,
        code_paths,
        inputs,
        attempts: job.attempts.into_iter().map(|a| a.id).collect(),
    }))
}

/// Read-only connections to the store, for the API: a finished job's record, a
/// page of the job list, a job's logs and result rows. Committed data only, as
/// every reply is sent after its commit.
#[derive(Clone)]
pub struct Reader {
    from: ReadFrom,
}

#[derive(Clone)]
enum ReadFrom {
    Lite(PathBuf, Idle<Connection>),
    Pg(String, Idle<PgConnection>),
}

/// Connections kept open for reuse, at most `IDLE_READERS`.
struct Idle<C>(Arc<Mutex<Vec<C>>>);

impl<C> Clone for Idle<C> {
    fn clone(&self) -> Self {
        Idle(self.0.clone())
    }
}

impl<C> Idle<C> {
    fn new() -> Self {
        Idle(Arc::default())
    }

    fn take(&self) -> Option<C> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).pop()
    }

    fn put_back(&self, conn: C) {
        let mut idle = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < IDLE_READERS {
            idle.push(conn);
        }
    }
}

impl std::fmt::Debug for Reader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.from {
            ReadFrom::Lite(path, _) => write!(f, "Reader {{ {} }}", path.display()),
            ReadFrom::Pg(url, _) => write!(f, "Reader {{ {} }}", crate::db::redact(url)),
        }
    }
}

/// Connections kept open for reuse.
const IDLE_READERS: usize = 4;

fn open_read_only(path: &Path) -> Result<Connection> {
    let conn = Connection::open_with_flags(
        path,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    Ok(conn)
}

impl Reader {
    pub fn open(path: &Path) -> Result<Self> {
        let idle = Idle::new();
        // Fail now, not at the first request, if it cannot be opened.
        idle.put_back(open_read_only(path)?);
        Ok(Reader {
            from: ReadFrom::Lite(path.to_path_buf(), idle),
        })
    }

    /// Reads what `db` writes.
    pub fn of(db: &Database) -> Result<Self> {
        match db {
            Database::Lite(conn) => match conn.path() {
                Some(path) if !path.is_empty() => Self::open(Path::new(path)),
                _ => Err(Error::Internal(
                    "an in-memory database has no readers".into(),
                )),
            },
            Database::Pg(conn) => Self::postgres(conn.url()),
        }
    }

    /// Reads from the PostgreSQL store at `url`.
    pub fn postgres(url: &str) -> Result<Self> {
        let idle = Idle::new();
        idle.put_back(PgConnection::connect(url)?);
        Ok(Reader {
            from: ReadFrom::Pg(url.to_string(), idle),
        })
    }

    /// Runs `f` on a SQLite connection, blocking.
    fn on_sqlite<T>(&self, f: impl FnOnce(&Connection) -> Result<T>) -> Result<T> {
        let ReadFrom::Lite(path, idle) = &self.from else {
            return Err(Error::Internal(
                "this reader reads PostgreSQL, not a SQLite file".into(),
            ));
        };
        let conn = match idle.take() {
            Some(conn) => conn,
            None => open_read_only(path)?,
        };
        let result = f(&conn);
        idle.put_back(conn);
        result
    }

    /// Runs `f` on a connection of either database, off the async runtime.
    pub(crate) async fn with_sql<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Sql) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || match &this.from {
            ReadFrom::Lite(..) => this.on_sqlite(|conn| f(&mut Sql::Lite(conn))),
            ReadFrom::Pg(url, idle) => {
                // A connection that failed checks itself before its next use.
                let mut conn = match idle.take() {
                    Some(conn) => conn,
                    None => PgConnection::connect(url)?,
                };
                let result = conn.transaction(f);
                idle.put_back(conn);
                result
            }
        })
        .await
        .map_err(|e| Error::Internal(format!("store reader: {e}")))?
    }

    /// The job as last committed.
    pub async fn job(&self, id: &str) -> Result<Option<Job>> {
        let id = id.to_string();
        self.with_sql(move |sql| {
            let body = sql.first("SELECT body FROM jobs WHERE id = ?1", &[&id], |r| {
                r.get::<String>(0)
            })?;
            body.map(|b| decode("job", &id, &b)).transpose()
        })
        .await
    }

    /// A page of jobs, newest first: at most `limit`, older than the job of seq
    /// `before` (None: from the newest), of one cluster or all; arrays once each
    /// (not their tasks), or, given `array`, that array's tasks.
    pub async fn jobs(
        &self,
        cluster: Option<String>,
        array: Option<u64>,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Vec<Job>> {
        self.with_sql(move |sql| {
            let before = before.map_or(i64::MAX, |b| b as i64);
            let array = array.map(|a| a as i64);
            sql.query(
                "SELECT id, body FROM jobs WHERE (CAST(?1 AS TEXT) IS NULL OR cluster = ?1) AND seq < ?2
                 AND ((CAST(?4 AS BIGINT) IS NULL AND array_seq IS NULL) OR array_seq = ?4)
                 ORDER BY seq DESC LIMIT ?3",
                &[&cluster, &before, &(limit as i64), &array],
                |r| {
                    let id: String = r.get(0)?;
                    let body: String = r.get(1)?;
                    decode("job", &id, &body)
                },
            )
        })
        .await
    }

    /// A mini-batch's items, as cut at submit.
    pub async fn items(&self, job_id: &str, index: u32) -> Result<Vec<u8>> {
        let job_id = job_id.to_string();
        self.with_sql(move |sql| {
            sql.first(
                "SELECT items FROM mini_batches WHERE job_id = ?1 AND idx = ?2",
                &[&job_id, &i64::from(index)],
                |r| r.get::<Vec<u8>>(0),
            )?
            .ok_or_else(|| Error::NotFound(format!("mini-batch {index} of job `{job_id}`")))
        })
        .await
    }

    /// The result rows of a job's done mini-batches, in mini-batch order.
    pub async fn rows(&self, job_id: &str) -> Result<Vec<u8>> {
        let job_id = job_id.to_string();
        self.with_sql(move |sql| {
            let parts = sql.query(
                "SELECT rows FROM mini_batches WHERE job_id = ?1 AND status = 'done' ORDER BY idx",
                &[&job_id],
                |r| r.get::<Option<Vec<u8>>>(0),
            )?;
            Ok(parts.into_iter().flatten().flatten().collect())
        })
        .await
    }

    /// Log chunks of a job after `after_seq`, oldest first, at most `limit`.
    pub async fn logs(
        &self,
        job_id: &str,
        instance: Option<u32>,
        after_seq: i64,
        limit: usize,
    ) -> Result<Vec<StoredLog>> {
        let job_id = job_id.to_string();
        self.with_sql(move |sql| {
            sql.query(
                "SELECT seq, job_id, attempt_id, instance, stream, data FROM logs
                 WHERE job_id = ?1 AND seq > ?2 AND (CAST(?3 AS BIGINT) IS NULL OR instance = ?3)
                 ORDER BY seq LIMIT ?4",
                &[
                    &job_id,
                    &after_seq,
                    &instance.map(i64::from),
                    &(limit as i64),
                ],
                |r| {
                    Ok(StoredLog {
                        seq: r.get(0)?,
                        job_id: r.get(1)?,
                        attempt_id: r.get(2)?,
                        instance: r.get::<i64>(3)? as u32,
                        stream: r.get(4)?,
                        data: r.get(5)?,
                    })
                },
            )
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{ClusterBuilder, JobBuilder, NodeBuilder};

    /// Each test runs on both databases: SQLite in a temporary folder, and a
    /// fresh database of a real PostgreSQL (`scripts/pg-up.sh`).
    enum Place {
        Lite(tempfile::TempDir),
        Pg(String),
    }

    impl Place {
        fn lite() -> Self {
            Place::Lite(tempfile::tempdir().expect("tempdir"))
        }

        fn pg() -> Self {
            Place::Pg(crate::db::test_postgres())
        }

        fn open(&self) -> SqlStore {
            match self {
                Place::Lite(dir) => SqlStore::open(&dir.path().join("shoal.db")).expect("open"),
                Place::Pg(url) => SqlStore::connect_postgres(url).expect("connect"),
            }
        }
    }

    #[tokio::test]
    async fn a_committed_batch_survives_reopening_in_sqlite() {
        a_committed_batch_survives_reopening(Place::lite()).await;
    }

    #[tokio::test]
    async fn a_committed_batch_survives_reopening_in_postgres() {
        a_committed_batch_survives_reopening(Place::pg()).await;
    }

    async fn a_committed_batch_survives_reopening(place: Place) {
        {
            let mut store = place.open();
            let batch = Batch {
                clusters: vec![Cluster {
                    spec: ClusterBuilder::new("c").build(),
                    created_at: 1,
                    errors: vec![],
                    lock: None,
                    identities: vec![],
                }],
                nodes: vec![NodeBuilder::new("c-n1").build()],
                jobs: vec![JobBuilder::new("job-1").build()],
                logs: vec![NewLog {
                    job_id: "job-1".into(),
                    attempt_id: "job-1.1".into(),
                    instance: 0,
                    stream: "stdout".into(),
                    data: b"hello\n".to_vec(),
                }],
                next_job_seq: Some(2),
                ..Default::default()
            };
            let committed = store.commit(&batch).expect("commit");
            assert_eq!(committed.log_seqs.len(), 1);
        }
        let mut store = place.open();
        let snapshot = store.load().expect("load");
        assert_eq!(snapshot.clusters.len(), 1);
        assert_eq!(snapshot.nodes[0].id, "c-n1");
        assert_eq!(snapshot.jobs[0].id, "job-1");
        assert_eq!(snapshot.next_job_seq, 2);
        let reader = store.reader().expect("reader");
        let logs = reader.logs("job-1", None, 0, 10).await.expect("logs");
        assert_eq!(logs[0].data, b"hello\n");
        assert!(
            reader
                .logs("job-1", Some(1), 0, 10)
                .await
                .expect("logs")
                .is_empty()
        );
    }

    fn ended(id: &str, seq: u64, ended_at: Millis) -> Job {
        let mut job = JobBuilder::new(id).build();
        job.seq = seq;
        job.status = JobStatus::Completed;
        job.ended_at = ended_at;
        job
    }

    #[tokio::test]
    async fn history_is_paged_loaded_only_when_recent_and_purged_with_its_logs_in_sqlite() {
        history_is_paged_loaded_only_when_recent_and_purged_with_its_logs(Place::lite()).await;
    }

    #[tokio::test]
    async fn history_is_paged_loaded_only_when_recent_and_purged_with_its_logs_in_postgres() {
        history_is_paged_loaded_only_when_recent_and_purged_with_its_logs(Place::pg()).await;
    }

    async fn history_is_paged_loaded_only_when_recent_and_purged_with_its_logs(place: Place) {
        let mut store = place.open();
        let mut live = JobBuilder::new("job-1").build();
        live.seq = 1;
        let mut jobs = vec![live];
        for n in 2..(RECENT_JOBS as u64 + 12) {
            jobs.push(ended(&format!("job-{n}"), n, n as Millis));
        }
        let logs = ["job-2", "job-3"]
            .iter()
            .map(|id| NewLog {
                job_id: id.to_string(),
                attempt_id: format!("{id}.1"),
                instance: 0,
                stream: "stdout".into(),
                data: b"x\n".to_vec(),
            })
            .collect();
        store
            .commit(&Batch {
                jobs,
                logs,
                ..Default::default()
            })
            .expect("commit");
        let snapshot = store.load().expect("load");
        assert_eq!(
            snapshot.jobs.len(),
            RECENT_JOBS + 1,
            "the live one and the recent ones"
        );
        assert!(snapshot.jobs.iter().any(|j| j.id == "job-1"));
        assert!(
            !snapshot.jobs.iter().any(|j| j.id == "job-2"),
            "old history stays on disk"
        );
        assert_eq!(
            snapshot.ended_counts.get(&JobStatus::Completed).copied(),
            Some(RECENT_JOBS as u64 + 10)
        );
        let reader = store.reader().expect("reader");
        let page = reader.jobs(None, None, None, 3).await.expect("page");
        let seqs: Vec<u64> = page.iter().map(|j| j.seq).collect();
        let newest = RECENT_JOBS as u64 + 11;
        assert_eq!(seqs, vec![newest, newest - 1, newest - 2], "newest first");
        let next = reader.jobs(None, None, Some(3), 10).await.expect("page");
        assert_eq!(next.iter().map(|j| j.seq).collect::<Vec<_>>(), vec![2, 1]);

        // Deleted on request, and by retention (ended before 4): with their logs.
        let committed = store
            .commit(&Batch {
                delete_jobs: vec!["job-9".into(), "job-nope".into()],
                purge_ended_before: Some(4),
                ..Default::default()
            })
            .expect("purge");
        let mut gone: Vec<String> = committed.purged.iter().map(|p| p.id.clone()).collect();
        gone.sort();
        assert_eq!(gone, vec!["job-2", "job-3", "job-9"]);
        assert!(reader.job("job-2").await.expect("read").is_none());
        assert!(
            reader
                .logs("job-2", None, 0, 10)
                .await
                .expect("logs")
                .is_empty()
        );
        assert!(
            reader.job("job-1").await.expect("read").is_some(),
            "live jobs stay"
        );
        assert!(reader.job("job-4").await.expect("read").is_some());
    }

    #[test]
    fn many_jobs_and_nodes_go_in_few_statements_and_one_put_twice_keeps_its_last_state() {
        for place in [Place::lite(), Place::pg()] {
            let mut store = place.open();
            // More than one statement's worth, and job-7 twice: queued, then running.
            let mut jobs: Vec<Job> = (1..=70)
                .map(|n| {
                    let mut job = JobBuilder::new(&format!("job-{n}")).build();
                    job.seq = n;
                    job
                })
                .collect();
            let mut again = jobs[6].clone();
            again.status = JobStatus::Running;
            jobs.push(again);
            // The same for nodes: n3 twice, its last message wins.
            let mut nodes: Vec<Node> = (1..=40)
                .map(|n| NodeBuilder::new(&format!("c-n{n}")).build())
                .collect();
            let mut later = nodes[2].clone();
            later.message = "later".into();
            nodes.push(later);
            store
                .commit(&Batch {
                    jobs,
                    nodes,
                    ..Default::default()
                })
                .expect("commit");
            let loaded = store.load().expect("load");
            assert_eq!(loaded.jobs.len(), 70);
            let seven = loaded.jobs.iter().find(|j| j.id == "job-7").expect("job-7");
            assert_eq!(seven.status, JobStatus::Running);
            assert_eq!(loaded.nodes.len(), 40);
            let three = loaded.nodes.iter().find(|n| n.id == "c-n3").expect("c-n3");
            assert_eq!(three.message, "later");
        }
    }

    #[test]
    fn a_postgres_connection_the_server_closed_is_made_again() {
        let url = crate::db::test_postgres();
        let mut store = SqlStore::connect_postgres(&url).expect("connect");
        let job = |id: &str, seq: u64| Batch {
            jobs: vec![{
                let mut job = JobBuilder::new(id).build();
                job.seq = seq;
                job
            }],
            ..Default::default()
        };
        store.commit(&job("job-1", 1)).expect("commit");
        // The server ends every other session of the database (a restart would).
        let mut admin = PgConnection::connect(&url).expect("admin");
        admin
            .transaction(|sql| {
                sql.query(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                     WHERE datname = current_database() AND pid <> pg_backend_pid()",
                    &[],
                    |r| r.get::<bool>(0),
                )
            })
            .expect("terminate");
        // The batch that finds the connection gone fails; the next one reconnects.
        let first = store.commit(&job("job-2", 2));
        if first.is_err() {
            store
                .commit(&job("job-2", 2))
                .expect("committed on a new connection");
        }
        let ids: Vec<String> = store
            .load()
            .expect("load")
            .jobs
            .iter()
            .map(|j| j.id.to_string())
            .collect();
        assert!(
            ids.contains(&"job-1".to_string()) && ids.contains(&"job-2".to_string()),
            "{ids:?}"
        );
    }

    #[test]
    fn a_newer_postgres_schema_is_refused() {
        let url = crate::db::test_postgres();
        drop(SqlStore::connect_postgres(&url).expect("connect"));
        let mut conn = PgConnection::connect(&url).expect("raw");
        conn.transaction(|sql| sql.execute("UPDATE shoal_schema SET version = 99", &[]))
            .expect("bump");
        let err = SqlStore::connect_postgres(&url).err().expect("refused");
        assert!(err.to_string().contains("newer"), "{err}");
    }

    #[test]
    fn a_newer_schema_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("shoal.db");
        drop(SqlStore::open(&path).expect("open"));
        let conn = Connection::open(&path).expect("raw");
        conn.pragma_update(None, "user_version", 99).expect("bump");
        drop(conn);
        let err = SqlStore::open(&path).err().expect("refused");
        assert!(err.to_string().contains("newer"), "{err}");
    }
}
