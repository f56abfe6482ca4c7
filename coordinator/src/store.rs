//! Durable state behind the `Store` trait: SQLite (bundled) with schema migrations.
//! The control loop writes one transaction per batch of changes, before any reply
//! or launch leaves the coordinator (durable before ack).

use std::path::Path;

use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::governance::Quotas;
use crate::model::{Cluster, Identity, Job, Node};
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
}

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
    }
}

pub trait Store: Send + 'static {
    fn load(&mut self) -> Result<Snapshot>;
    /// Writes the whole batch in one transaction; returns the sequence numbers given
    /// to `batch.logs`, in order.
    fn commit(&mut self, batch: &Batch) -> Result<Vec<i64>>;
    /// A mini-batch's items, as cut at submit.
    fn read_items(&mut self, job_id: &str, index: u32) -> Result<Vec<u8>>;
    /// The result rows of a job's done mini-batches, in mini-batch order.
    fn read_rows(&mut self, job_id: &str) -> Result<Vec<u8>>;
    /// Log chunks of a job after `after_seq`, oldest first, at most `limit`.
    fn read_logs(
        &mut self,
        job_id: &str,
        instance: Option<u32>,
        after_seq: i64,
        limit: usize,
    ) -> Result<Vec<StoredLog>>;
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
];

pub struct SqliteStore {
    conn: Connection,
}

impl SqliteStore {
    pub fn open(path: &Path) -> Result<Self> {
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        // FULL: a committed batch survives power loss, not only a killed process.
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        Self::migrate(conn)
    }

    /// The in-memory store, for tests of the control loop.
    pub fn in_memory() -> Result<Self> {
        Self::migrate(Connection::open_in_memory()?)
    }

    fn migrate(mut conn: Connection) -> Result<Self> {
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
        Ok(SqliteStore { conn })
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
            jobs: load_table(&self.conn, "SELECT id, body FROM jobs ORDER BY seq", "job")?,
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
                let mut stmt = self.conn.prepare(
                    "SELECT job_id, idx, item_count, status, executions, failures, lease, node,
                            deadline, message FROM mini_batches ORDER BY job_id, idx",
                )?;
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
                        },
                    ))
                })?;
                rows.collect::<rusqlite::Result<Vec<_>>>()?
            },
        })
    }

    fn commit(&mut self, batch: &Batch) -> Result<Vec<i64>> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let tx = self.conn.transaction()?;
        let mut log_seqs = Vec::with_capacity(batch.logs.len());
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
                "INSERT OR REPLACE INTO jobs (id, seq, cluster, status, body) VALUES (?1, ?2, ?3, ?4, ?5)",
            )?;
            for job in &batch.jobs {
                put_job.execute(params![
                    job.id,
                    job.seq as i64,
                    job.spec.cluster,
                    job.status.as_str(),
                    encode(job)?
                ])?;
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
                        node = ?7, deadline = ?8, message = ?9
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
                    b.message
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
            if let Some(quotas) = &batch.quotas {
                tx.prepare_cached(
                    "INSERT OR REPLACE INTO settings (key, body) VALUES ('quotas', ?1)",
                )?
                .execute([encode(quotas)?])?;
            }
        }
        tx.commit()?;
        Ok(log_seqs)
    }

    fn read_items(&mut self, job_id: &str, index: u32) -> Result<Vec<u8>> {
        Ok(self.conn.query_row(
            "SELECT items FROM mini_batches WHERE job_id = ?1 AND idx = ?2",
            params![job_id, index],
            |r| r.get(0),
        )?)
    }

    fn read_rows(&mut self, job_id: &str) -> Result<Vec<u8>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT rows FROM mini_batches WHERE job_id = ?1 AND status = 'done' ORDER BY idx",
        )?;
        let mut out = Vec::new();
        let mut rows = stmt.query([job_id])?;
        while let Some(row) = rows.next()? {
            let data: Option<Vec<u8>> = row.get(0)?;
            out.extend_from_slice(&data.unwrap_or_default());
        }
        Ok(out)
    }

    fn read_logs(
        &mut self,
        job_id: &str,
        instance: Option<u32>,
        after_seq: i64,
        limit: usize,
    ) -> Result<Vec<StoredLog>> {
        let mut stmt = self.conn.prepare_cached(
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
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{ClusterBuilder, JobBuilder, NodeBuilder};

    #[test]
    fn a_committed_batch_survives_reopening() {
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
            let seqs = store.commit(&batch).expect("commit");
            assert_eq!(seqs.len(), 1);
        }
        let mut store = SqliteStore::open(&path).expect("reopen");
        let snapshot = store.load().expect("load");
        assert_eq!(snapshot.clusters.len(), 1);
        assert_eq!(snapshot.nodes[0].id, "c-n1");
        assert_eq!(snapshot.jobs[0].id, "job-1");
        assert_eq!(snapshot.next_job_seq, 2);
        let logs = store.read_logs("job-1", None, 0, 10).expect("logs");
        assert_eq!(logs[0].data, b"hello\n");
        assert!(
            store
                .read_logs("job-1", Some(1), 0, 10)
                .expect("logs")
                .is_empty()
        );
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
