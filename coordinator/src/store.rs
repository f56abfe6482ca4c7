//! Durable state behind the `Store` trait: SQLite (bundled) with schema migrations.
//! The control loop writes one transaction per batch of changes, before any reply
//! or launch leaves the coordinator (durable before ack). The API reads history
//! (finished jobs, logs, result rows) through a `Reader` of its own: read-only
//! connections that never go through the loop.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::data::{DataAsset, Datastore};
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

/// Statuses of ended jobs, as stored.
const ENDED: &str = "('completed', 'failed', 'canceled', 'timed_out')";

pub struct SqliteStore {
    conn: Connection,
    path: PathBuf,
    /// A store of tests lives in a folder of its own, removed with it.
    _scratch: Option<tempfile::TempDir>,
}

impl SqliteStore {
    pub fn open(path: &Path) -> Result<Self> {
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        // FULL: a committed batch survives power loss, not only a killed process.
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        Self::migrate(conn, path.to_path_buf(), None)
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
        Self::migrate(conn, path, Some(scratch))
    }

    /// Read-only connections for the API (history, logs, rows).
    pub fn reader(&self) -> Result<Reader> {
        Reader::open(&self.path)
    }

    fn migrate(
        mut conn: Connection,
        path: PathBuf,
        scratch: Option<tempfile::TempDir>,
    ) -> Result<Self> {
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
        Ok(SqliteStore {
            conn,
            path,
            _scratch: scratch,
        })
    }

    fn meta(&self, key: &str) -> Result<u64> {
        let value: Option<i64> = self
            .conn
            .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
            .optional()?;
        Ok(value.unwrap_or(0) as u64)
    }
}

fn decode<T: DeserializeOwned>(table: &str, key: &str, body: &str) -> Result<T> {
    serde_json::from_str(body)
        .map_err(|e| Error::Internal(format!("stored {table} row `{key}` is unreadable: {e}")))
}

fn encode<T: Serialize>(value: &T) -> Result<String> {
    serde_json::to_string(value).map_err(|e| Error::Internal(format!("encoding: {e}")))
}

fn load_table<T: DeserializeOwned>(conn: &Connection, sql: &str, table: &str) -> Result<Vec<T>> {
    let mut stmt = conn.prepare(sql)?;
    let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
    let mut out = Vec::new();
    for row in rows {
        let (key, body) = row?;
        out.push(decode(table, &key, &body)?);
    }
    Ok(out)
}

impl Store for SqliteStore {
    fn load(&mut self) -> Result<Snapshot> {
        Ok(Snapshot {
            clusters: load_table(&self.conn, "SELECT name, body FROM clusters", "cluster")?,
            nodes: load_table(&self.conn, "SELECT id, body FROM nodes", "node")?,
            identities: load_table(
                &self.conn,
                "SELECT name, body FROM identities ORDER BY name",
                "identity",
            )?,
            jobs: load_table(
                &self.conn,
                &format!(
                    "SELECT id, body FROM jobs WHERE status NOT IN {ENDED}
                     UNION ALL
                     SELECT * FROM (SELECT id, body FROM jobs WHERE status IN {ENDED}
                                    ORDER BY ended_at DESC LIMIT {RECENT_JOBS})"
                ),
                "job",
            )?,
            datastores: load_table(&self.conn, "SELECT name, body FROM datastores", "datastore")?,
            data_assets: load_table(
                &self.conn,
                "SELECT name || ':' || version, body FROM data_assets",
                "data asset",
            )?,
            environments: load_table(
                &self.conn,
                "SELECT name || ':' || version, body FROM environments",
                "environment",
            )?,
            components: load_table(
                &self.conn,
                "SELECT name || ':' || version, body FROM components",
                "component",
            )?,
            defaults: {
                let body: Option<String> = self
                    .conn
                    .query_row(
                        "SELECT body FROM settings WHERE key = 'defaults'",
                        [],
                        |r| r.get(0),
                    )
                    .optional()?;
                body.map(|b| decode("settings", "defaults", &b))
                    .transpose()?
                    .unwrap_or_default()
            },
            ended_counts: {
                let mut stmt = self.conn.prepare(&format!(
                    "SELECT status, count(*) FROM jobs WHERE status IN {ENDED} GROUP BY status"
                ))?;
                let rows =
                    stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
                let mut counts = BTreeMap::new();
                for row in rows {
                    let (status, count) = row?;
                    if let Some(status) = JobStatus::parse(&status) {
                        counts.insert(status, count as u64);
                    }
                }
                counts
            },
            next_job_seq: self.meta("next_job_seq")?.max(1),
            next_node_seq: self.meta("next_node_seq")?.max(1),
            quotas: {
                let body: Option<String> = self
                    .conn
                    .query_row("SELECT body FROM settings WHERE key = 'quotas'", [], |r| {
                        r.get(0)
                    })
                    .optional()?;
                body.map(|b| decode("settings", "quotas", &b)).transpose()?
            },
            mini_batches: {
                let mut stmt = self.conn.prepare(&format!(
                    "SELECT job_id, idx, item_count, status, executions, failures, lease, node,
                            deadline, message, failed_items FROM mini_batches
                     WHERE job_id IN (SELECT id FROM jobs WHERE status NOT IN {ENDED})
                     ORDER BY job_id, idx"
                ))?;
                let rows = stmt.query_map([], |r| {
                    let status: String = r.get(3)?;
                    Ok((
                        r.get::<_, String>(0)?,
                        MiniBatch {
                            index: r.get(1)?,
                            items: r.get::<_, i64>(2)? as u64,
                            status: BatchStatus::parse(&status).unwrap_or(BatchStatus::Pending),
                            executions: r.get(4)?,
                            failures: r.get(5)?,
                            lease: r.get(6)?,
                            node: r.get(7)?,
                            deadline: r.get(8)?,
                            message: r.get(9)?,
                            failed_items: r.get::<_, i64>(10)? as u64,
                        },
                    ))
                })?;
                rows.collect::<rusqlite::Result<Vec<_>>>()?
            },
        })
    }

    fn commit(&mut self, batch: &Batch) -> Result<Committed> {
        if batch.is_empty() {
            return Ok(Committed::default());
        }
        let tx = self.conn.transaction()?;
        let mut log_seqs = Vec::with_capacity(batch.logs.len());
        let mut purged = Vec::new();
        {
            let mut put_cluster =
                tx.prepare_cached("INSERT OR REPLACE INTO clusters (name, body) VALUES (?1, ?2)")?;
            for cluster in &batch.clusters {
                put_cluster.execute(params![cluster.spec.name, encode(cluster)?])?;
            }
            let mut del_cluster = tx.prepare_cached("DELETE FROM clusters WHERE name = ?1")?;
            for name in &batch.deleted_clusters {
                del_cluster.execute([name])?;
            }
            let mut put_node = tx.prepare_cached(
                "INSERT OR REPLACE INTO nodes (id, cluster, body) VALUES (?1, ?2, ?3)",
            )?;
            for node in &batch.nodes {
                put_node.execute(params![node.id, node.cluster, encode(node)?])?;
            }
            let mut del_node = tx.prepare_cached("DELETE FROM nodes WHERE id = ?1")?;
            for id in &batch.deleted_nodes {
                del_node.execute([id])?;
            }
            let mut put_job = tx.prepare_cached(
                "INSERT OR REPLACE INTO jobs (id, seq, cluster, status, body, ended_at, array_seq)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )?;
            for job in &batch.jobs {
                let ended_at = if job.status.is_final() {
                    job.ended_at
                } else {
                    0
                };
                put_job.execute(params![
                    job.id.as_str(),
                    job.seq as i64,
                    job.spec.cluster.as_str(),
                    job.status.as_str(),
                    encode(job)?,
                    ended_at,
                    job.parent_seq().map(|seq| seq as i64)
                ])?;
            }
            let mut doomed: Vec<String> = batch.delete_jobs.clone();
            if let Some(before) = batch.purge_ended_before {
                let mut stmt = tx.prepare_cached(&format!(
                    "SELECT id FROM jobs WHERE ended_at > 0 AND ended_at < ?1
                     AND status IN {ENDED} LIMIT {PURGE_PER_BATCH}"
                ))?;
                let ids = stmt.query_map([before], |r| r.get::<_, String>(0))?;
                for id in ids {
                    doomed.push(id?);
                }
            }
            for id in doomed {
                // An array goes with its tasks, a sweep with its trials, a pipeline
                // with its steps (and a sweep step with its trials).
                let mut family = vec![id];
                let mut at = 0;
                while at < family.len() {
                    if let Some(seq) = crate::control::job_seq(&family[at]) {
                        let children: Vec<String> = tx
                            .prepare_cached("SELECT id FROM jobs WHERE array_seq = ?1")?
                            .query_map([seq as i64], |r| r.get::<_, String>(0))?
                            .collect::<rusqlite::Result<_>>()?;
                        family.extend(children);
                    }
                    at += 1;
                }
                for id in family.iter().rev() {
                    if let Some(gone) = delete_job(&tx, id)? {
                        purged.push(gone);
                    }
                }
            }
            let mut put_log = tx.prepare_cached(
                "INSERT INTO logs (job_id, attempt_id, instance, stream, data) VALUES (?1, ?2, ?3, ?4, ?5)",
            )?;
            for log in &batch.logs {
                put_log.execute(params![
                    log.job_id,
                    log.attempt_id,
                    log.instance,
                    log.stream,
                    log.data
                ])?;
                log_seqs.push(tx.last_insert_rowid());
            }
            let mut put_meta =
                tx.prepare_cached("INSERT OR REPLACE INTO meta (key, value) VALUES (?1, ?2)")?;
            if let Some(seq) = batch.next_job_seq {
                put_meta.execute(params!["next_job_seq", seq as i64])?;
            }
            if let Some(seq) = batch.next_node_seq {
                put_meta.execute(params!["next_node_seq", seq as i64])?;
            }
            let mut new_batch = tx.prepare_cached(
                "INSERT INTO mini_batches (job_id, idx, item_count, status, executions, failures,
                                           message, items)
                 VALUES (?1, ?2, ?3, 'pending', 0, 0, '', ?4)",
            )?;
            for (job_id, cuts) in &batch.new_mini_batches {
                for (index, cut) in cuts.iter().enumerate() {
                    new_batch.execute(params![
                        job_id,
                        index as i64,
                        cut.count as i64,
                        cut.items
                    ])?;
                }
            }
            let mut put_batch = tx.prepare_cached(
                "UPDATE mini_batches SET status = ?3, executions = ?4, failures = ?5, lease = ?6,
                        node = ?7, deadline = ?8, message = ?9, failed_items = ?10
                 WHERE job_id = ?1 AND idx = ?2",
            )?;
            for (job_id, b) in &batch.mini_batches {
                put_batch.execute(params![
                    job_id,
                    b.index,
                    b.status.as_str(),
                    b.executions,
                    b.failures,
                    b.lease,
                    b.node,
                    b.deadline,
                    b.message,
                    b.failed_items as i64
                ])?;
            }
            let mut put_rows = tx.prepare_cached(
                "UPDATE mini_batches SET rows = ?3 WHERE job_id = ?1 AND idx = ?2",
            )?;
            for (job_id, index, rows) in &batch.mini_batch_rows {
                put_rows.execute(params![job_id, index, rows])?;
            }
            let mut put_identity = tx
                .prepare_cached("INSERT OR REPLACE INTO identities (name, body) VALUES (?1, ?2)")?;
            for identity in &batch.identities {
                put_identity.execute(params![identity.name, encode(identity)?])?;
            }
            let mut put_datastore = tx
                .prepare_cached("INSERT OR REPLACE INTO datastores (name, body) VALUES (?1, ?2)")?;
            for datastore in &batch.datastores {
                put_datastore.execute(params![datastore.name, encode(datastore)?])?;
            }
            let mut put_asset = tx.prepare_cached(
                "INSERT OR REPLACE INTO data_assets (name, version, body) VALUES (?1, ?2, ?3)",
            )?;
            for asset in &batch.data_assets {
                put_asset.execute(params![asset.name, asset.version, encode(asset)?])?;
            }
            let mut put_environment = tx.prepare_cached(
                "INSERT OR REPLACE INTO environments (name, version, body) VALUES (?1, ?2, ?3)",
            )?;
            for environment in &batch.environments {
                put_environment.execute(params![
                    environment.name,
                    environment.version,
                    encode(environment)?
                ])?;
            }
            let mut put_component = tx.prepare_cached(
                "INSERT OR REPLACE INTO components (name, version, body) VALUES (?1, ?2, ?3)",
            )?;
            for component in &batch.components {
                put_component.execute(params![
                    component.name,
                    component.version,
                    encode(component)?
                ])?;
            }
            if let Some(defaults) = &batch.defaults {
                tx.prepare_cached(
                    "INSERT OR REPLACE INTO settings (key, body) VALUES ('defaults', ?1)",
                )?
                .execute([encode(defaults)?])?;
            }
            if let Some(quotas) = &batch.quotas {
                tx.prepare_cached(
                    "INSERT OR REPLACE INTO settings (key, body) VALUES ('quotas', ?1)",
                )?
                .execute([encode(quotas)?])?;
            }
        }
        tx.commit()?;
        Ok(Committed { log_seqs, purged })
    }
}

/// Deletes one job with its logs and mini-batches; what of it lives in files.
fn delete_job(tx: &rusqlite::Transaction<'_>, id: &str) -> Result<Option<Purged>> {
    let body: Option<String> = tx
        .prepare_cached("SELECT body FROM jobs WHERE id = ?1")?
        .query_row([id], |r| r.get(0))
        .optional()?;
    let Some(body) = body else {
        return Ok(None);
    };
    let job: Job = decode("job", id, &body)?;
    tx.prepare_cached("DELETE FROM logs WHERE job_id = ?1")?
        .execute([id])?;
    tx.prepare_cached("DELETE FROM mini_batches WHERE job_id = ?1")?
        .execute([id])?;
    tx.prepare_cached("DELETE FROM jobs WHERE id = ?1")?
        .execute([id])?;
    // A parallel step never made kept its mini-batches under the job it would be.
    for step in job.pipeline.iter().flat_map(|p| &p.steps) {
        if let Some(parallel) = step
            .parallel
            .as_ref()
            .filter(|p| step.seq != Some(p.job_seq))
        {
            tx.prepare_cached("DELETE FROM mini_batches WHERE job_id = ?1")?
                .execute([crate::control::job_id(parallel.job_seq)])?;
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
    path: PathBuf,
    idle: Arc<Mutex<Vec<Connection>>>,
}

impl std::fmt::Debug for Reader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Reader {{ {} }}", self.path.display())
    }
}

/// Connections kept open for reuse.
const IDLE_READERS: usize = 4;

impl Reader {
    pub fn open(path: &Path) -> Result<Self> {
        let reader = Reader {
            path: path.to_path_buf(),
            idle: Arc::default(),
        };
        // Fail now, not at the first request, if it cannot be opened.
        let conn = reader.connect()?;
        reader.put_back(conn);
        Ok(reader)
    }

    fn connect(&self) -> Result<Connection> {
        let conn = Connection::open_with_flags(
            &self.path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        Ok(conn)
    }

    fn put_back(&self, conn: Connection) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < IDLE_READERS {
            idle.push(conn);
        }
    }

    /// Runs `f` on a connection, off the async runtime.
    pub(crate) async fn with<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            let taken = this.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
            let conn = match taken {
                Some(conn) => conn,
                None => this.connect()?,
            };
            let result = f(&conn);
            this.put_back(conn);
            result
        })
        .await
        .map_err(|e| Error::Internal(format!("store reader: {e}")))?
    }

    /// The job as last committed.
    pub async fn job(&self, id: &str) -> Result<Option<Job>> {
        let id = id.to_string();
        self.with(move |conn| {
            let body: Option<String> = conn
                .prepare_cached("SELECT body FROM jobs WHERE id = ?1")?
                .query_row([&id], |r| r.get(0))
                .optional()?;
            body.map(|b| decode("job", &id, &b)).transpose()
        })
        .await
    }

    /// Jobs newest first: at most `limit`, older than the job of seq `before`
    /// (None: from the newest), of one cluster or all.
    /// A page of jobs, newest first: arrays once each (not their tasks), or,
    /// given `array`, that array's tasks.
    pub async fn jobs(
        &self,
        cluster: Option<String>,
        array: Option<u64>,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Vec<Job>> {
        self.with(move |conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT id, body FROM jobs WHERE (?1 IS NULL OR cluster = ?1) AND seq < ?2
                 AND ((?4 IS NULL AND array_seq IS NULL) OR array_seq = ?4)
                 ORDER BY seq DESC LIMIT ?3",
            )?;
            let before = before.map_or(i64::MAX, |b| b as i64);
            let array = array.map(|a| a as i64);
            let rows = stmt.query_map(params![cluster, before, limit as i64, array], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
            })?;
            let mut jobs = Vec::new();
            for row in rows {
                let (id, body) = row?;
                jobs.push(decode("job", &id, &body)?);
            }
            Ok(jobs)
        })
        .await
    }

    /// A mini-batch's items, as cut at submit.
    pub async fn items(&self, job_id: &str, index: u32) -> Result<Vec<u8>> {
        let job_id = job_id.to_string();
        self.with(move |conn| {
            Ok(conn
                .prepare_cached("SELECT items FROM mini_batches WHERE job_id = ?1 AND idx = ?2")?
                .query_row(params![job_id, index], |r| r.get(0))?)
        })
        .await
    }

    /// The result rows of a job's done mini-batches, in mini-batch order.
    pub async fn rows(&self, job_id: &str) -> Result<Vec<u8>> {
        let job_id = job_id.to_string();
        self.with(move |conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT rows FROM mini_batches WHERE job_id = ?1 AND status = 'done' ORDER BY idx",
            )?;
            let mut out = Vec::new();
            let mut rows = stmt.query([&job_id])?;
            while let Some(row) = rows.next()? {
                let data: Option<Vec<u8>> = row.get(0)?;
                out.extend_from_slice(&data.unwrap_or_default());
            }
            Ok(out)
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
        self.with(move |conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT seq, job_id, attempt_id, instance, stream, data FROM logs
                 WHERE job_id = ?1 AND seq > ?2 AND (?3 IS NULL OR instance = ?3)
                 ORDER BY seq LIMIT ?4",
            )?;
            let rows = stmt.query_map(params![job_id, after_seq, instance, limit as i64], |r| {
                Ok(StoredLog {
                    seq: r.get(0)?,
                    job_id: r.get(1)?,
                    attempt_id: r.get(2)?,
                    instance: r.get(3)?,
                    stream: r.get(4)?,
                    data: r.get(5)?,
                })
            })?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{ClusterBuilder, JobBuilder, NodeBuilder};

    #[tokio::test]
    async fn a_committed_batch_survives_reopening() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("shoal.db");
        {
            let mut store = SqliteStore::open(&path).expect("open");
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
        let mut store = SqliteStore::open(&path).expect("reopen");
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
    async fn history_is_paged_loaded_only_when_recent_and_purged_with_its_logs() {
        let mut store = SqliteStore::in_memory().expect("store");
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
    fn a_newer_schema_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("shoal.db");
        drop(SqliteStore::open(&path).expect("open"));
        let conn = Connection::open(&path).expect("raw");
        conn.pragma_update(None, "user_version", 99).expect("bump");
        drop(conn);
        let err = SqliteStore::open(&path).err().expect("refused");
        assert!(err.to_string().contains("newer"), "{err}");
    }
}
