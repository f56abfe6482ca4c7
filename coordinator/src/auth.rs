//! Who may call what. Every gRPC and HTTP endpoint but `/healthz` needs a bearer
//! token: an API token with a role (reader < user < admin) for people and scripts,
//! or a node credential for an agent (issued by the coordinator when it starts the
//! node, valid for that node only). Tokens are `shoal_<id>_<secret>`; only the
//! SHA-256 of the secret is kept, in `auth.db` (SQLite) beside the state.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};

use rand::RngCore;
use rusqlite::Connection;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::db::{Database, Sql};
use crate::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    Reader,
    User,
    Admin,
}

impl Role {
    pub fn parse(text: &str) -> Result<Self> {
        match text {
            "reader" => Ok(Role::Reader),
            "user" => Ok(Role::User),
            "admin" => Ok(Role::Admin),
            other => Err(Error::invalid(
                "role",
                format!("`{other}` is not reader, user or admin"),
            )),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Reader => "reader",
            Role::User => "user",
            Role::Admin => "admin",
        }
    }
}

/// Who a request comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Principal {
    /// An API token.
    Person { token_id: String, role: Role },
    /// A node's agent.
    Node { node_id: String },
}

#[derive(Clone, Debug)]
struct Entry {
    /// `node` for node credentials, else the role.
    kind: String,
    /// The node id, or the token's name.
    subject: String,
    secret_sha256: Vec<u8>,
    revoked: bool,
}

/// A token as listed (never its secret).
#[derive(Clone, Debug)]
pub struct TokenInfo {
    pub id: String,
    pub kind: String,
    pub subject: String,
    pub created_at_ms: i64,
    pub revoked: bool,
}

/// Where tokens are kept: `auth.db` beside the SQLite store, or the tables
/// `tokens` and `join_tokens` of the PostgreSQL store's database.
#[derive(Clone)]
pub struct Auth {
    db: Arc<Mutex<Database>>,
    cache: Arc<RwLock<HashMap<String, Entry>>>,
}

/// `bytes` random bytes, in hex.
pub(crate) fn random_hex(bytes: usize) -> String {
    let mut buffer = vec![0u8; bytes];
    rand::rng().fill_bytes(&mut buffer);
    hex::encode(buffer)
}

fn sha256(text: &str) -> Vec<u8> {
    Sha256::digest(text.as_bytes()).to_vec()
}

pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Auth { .. }")
    }
}

impl Auth {
    pub fn open(path: &Path) -> Result<Self> {
        let conn = Connection::open(path)?;
        conn.execute_batch(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL;
             CREATE TABLE IF NOT EXISTS tokens (
               id TEXT PRIMARY KEY, kind TEXT NOT NULL, subject TEXT NOT NULL,
               secret_sha256 BLOB NOT NULL, created_at INTEGER NOT NULL,
               revoked_at INTEGER);
             CREATE TABLE IF NOT EXISTS join_tokens (
               id TEXT PRIMARY KEY, cluster TEXT NOT NULL, secret_sha256 BLOB NOT NULL,
               expires_at INTEGER NOT NULL, uses_left INTEGER NOT NULL,
               created_at INTEGER NOT NULL, revoked_at INTEGER);
             CREATE TABLE IF NOT EXISTS identities (
               name TEXT PRIMARY KEY, client_id TEXT NOT NULL UNIQUE, created_at INTEGER NOT NULL);
             CREATE TABLE IF NOT EXISTS cluster_identities (
               cluster TEXT NOT NULL, kind TEXT NOT NULL, client_id TEXT NOT NULL,
               PRIMARY KEY (cluster, client_id));",
        )?;
        // A join token a provider made for one node it is bringing up ('' for any).
        let has_node: bool = conn
            .prepare("SELECT 1 FROM pragma_table_info('join_tokens') WHERE name = 'node_id'")?
            .exists([])?;
        if !has_node {
            conn.execute_batch(
                "ALTER TABLE join_tokens ADD COLUMN node_id TEXT NOT NULL DEFAULT ''",
            )?;
        }
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
        }
        Self::with(Database::Lite(conn))
    }

    /// Tokens in the PostgreSQL store's database at `url`.
    pub fn postgres(url: &str) -> Result<Self> {
        let mut conn = crate::db::PgConnection::connect(url)?;
        conn.transaction(|sql| {
            sql.execute("SELECT pg_advisory_xact_lock(7071)", &[])?;
            sql.batch(
                "CREATE TABLE IF NOT EXISTS tokens (
                   id TEXT PRIMARY KEY, kind TEXT NOT NULL, subject TEXT NOT NULL,
                   secret_sha256 BYTEA NOT NULL, created_at BIGINT NOT NULL,
                   revoked_at BIGINT);
                 CREATE TABLE IF NOT EXISTS join_tokens (
                   id TEXT PRIMARY KEY, cluster TEXT NOT NULL, secret_sha256 BYTEA NOT NULL,
                   expires_at BIGINT NOT NULL, uses_left BIGINT NOT NULL,
                   created_at BIGINT NOT NULL, revoked_at BIGINT,
                   node_id TEXT NOT NULL DEFAULT '');",
            )
        })?;
        Self::with(Database::Pg(Box::new(conn)))
    }

    fn with(db: Database) -> Result<Self> {
        let auth = Auth {
            db: Arc::new(Mutex::new(db)),
            cache: Arc::default(),
        };
        auth.reload()?;
        Ok(auth)
    }

    pub fn in_memory() -> Result<Self> {
        Self::open(Path::new(":memory:"))
    }

    /// Runs `f` on the database, in one transaction. Called from request
    /// handlers: the wait (a file write, a round trip to PostgreSQL) does not
    /// hold up the other tasks of the async worker it runs on.
    fn sql<T: Send>(&self, f: impl FnOnce(&mut Sql) -> Result<T> + Send) -> Result<T> {
        crate::db::blocking(|| {
            let mut db = self.db.lock().unwrap_or_else(|p| p.into_inner());
            db.transaction(f)
        })
    }

    fn reload(&self) -> Result<()> {
        let loaded = self.sql(|sql: &mut Sql| {
            sql.query(
                "SELECT id, kind, subject, secret_sha256, revoked_at IS NOT NULL FROM tokens",
                &[],
                |r| {
                    Ok((
                        r.get::<String>(0)?,
                        Entry {
                            kind: r.get(1)?,
                            subject: r.get(2)?,
                            secret_sha256: r.get(3)?,
                            revoked: r.get(4)?,
                        },
                    ))
                },
            )
        })?;
        *self.cache.write().unwrap_or_else(|p| p.into_inner()) = loaded.into_iter().collect();
        Ok(())
    }

    fn issue(&self, kind: &str, subject: &str) -> Result<String> {
        let id = random_hex(6);
        let secret = random_hex(24);
        self.sql(|sql: &mut Sql| {
            sql.execute(
                "INSERT INTO tokens (id, kind, subject, secret_sha256, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
                &[&id, &kind, &subject, &sha256(&secret), &now_ms()],
            )
        })?;
        self.cache
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                id.clone(),
                Entry {
                    kind: kind.into(),
                    subject: subject.into(),
                    secret_sha256: sha256(&secret),
                    revoked: false,
                },
            );
        Ok(format!("shoal_{id}_{secret}"))
    }

    /// A new API token with `role`; `name` says what it is for.
    pub fn create_token(&self, role: Role, name: &str) -> Result<String> {
        self.issue(role.as_str(), name)
    }

    /// A node's credential (an earlier one of the node is revoked).
    pub fn node_credential(&self, node_id: &str) -> Result<String> {
        self.revoke_node(node_id)?;
        self.issue("node", node_id)
    }

    pub fn has_admin(&self) -> bool {
        let cache = self.cache.read().unwrap_or_else(|p| p.into_inner());
        cache.values().any(|e| e.kind == "admin" && !e.revoked)
    }

    pub fn revoke(&self, id: &str) -> Result<bool> {
        let changed = self.sql(|sql: &mut Sql| {
            sql.execute(
                "UPDATE tokens SET revoked_at = ?2 WHERE id = ?1 AND revoked_at IS NULL",
                &[&id, &now_ms()],
            )
        })?;
        if let Some(entry) = self
            .cache
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(id)
        {
            entry.revoked = true;
        }
        Ok(changed > 0)
    }

    pub fn revoke_node(&self, node_id: &str) -> Result<()> {
        let ids: Vec<String> = {
            let cache = self.cache.read().unwrap_or_else(|p| p.into_inner());
            cache
                .iter()
                .filter(|(_, e)| e.kind == "node" && e.subject == node_id && !e.revoked)
                .map(|(id, _)| id.clone())
                .collect()
        };
        for id in ids {
            self.revoke(&id)?;
        }
        Ok(())
    }

    /// Forgets tokens revoked before `before_ms` (node credentials of nodes long
    /// gone, mostly); they then read as unknown. How many.
    pub fn purge_revoked(&self, before_ms: i64) -> Result<usize> {
        let gone: Vec<String> = self.sql(|sql: &mut Sql| {
            let ids = sql.query(
                "SELECT id FROM tokens WHERE revoked_at IS NOT NULL AND revoked_at < ?1",
                &[&before_ms],
                |r| r.get::<String>(0),
            )?;
            sql.execute(
                "DELETE FROM tokens WHERE revoked_at IS NOT NULL AND revoked_at < ?1",
                &[&before_ms],
            )?;
            sql.execute(
                "DELETE FROM join_tokens WHERE (revoked_at IS NOT NULL AND revoked_at < ?1)
                 OR expires_at < ?1 OR uses_left <= 0 AND created_at < ?1",
                &[&before_ms],
            )?;
            Ok(ids)
        })?;
        let mut cache = self.cache.write().unwrap_or_else(|p| p.into_inner());
        for id in &gone {
            cache.remove(id);
        }
        Ok(gone.len())
    }

    pub fn list(&self) -> Result<Vec<TokenInfo>> {
        self.sql(|sql: &mut Sql| {
            sql.query(
                "SELECT id, kind, subject, created_at, revoked_at IS NOT NULL FROM tokens
                 WHERE kind != 'node' ORDER BY created_at",
                &[],
                |r| {
                    Ok(TokenInfo {
                        id: r.get(0)?,
                        kind: r.get(1)?,
                        subject: r.get(2)?,
                        created_at_ms: r.get(3)?,
                        revoked: r.get(4)?,
                    })
                },
            )
        })
    }

    /// Who presents `token`, or why not.
    pub fn verify(&self, token: &str) -> std::result::Result<Principal, &'static str> {
        let Some(rest) = token.strip_prefix("shoal_") else {
            return Err("not a Shoal token");
        };
        let Some((id, secret)) = rest.split_once('_') else {
            return Err("not a Shoal token");
        };
        let cache = self.cache.read().unwrap_or_else(|p| p.into_inner());
        let Some(entry) = cache.get(id) else {
            return Err("unknown token");
        };
        let digest = sha256(secret);
        if !bool::from(digest.ct_eq(&entry.secret_sha256)) {
            return Err("wrong token");
        }
        if entry.revoked {
            return Err("revoked token");
        }
        if entry.kind == "node" {
            return Ok(Principal::Node {
                node_id: entry.subject.clone(),
            });
        }
        let role = Role::parse(&entry.kind).map_err(|_| "token of an unknown kind")?;
        Ok(Principal::Person {
            token_id: id.to_string(),
            role,
        })
    }
}

/// What a join token was made for: a new node of a cluster, or one node a
/// provider is bringing up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JoinAs {
    pub cluster: String,
    pub node_id: Option<String>,
}

/// A join token as listed.
#[derive(Clone, Debug)]
pub struct JoinTokenInfo {
    pub id: String,
    pub cluster: String,
    pub expires_at_ms: i64,
    pub uses_left: i64,
    pub revoked: bool,
}

impl Auth {
    /// A join token for `cluster`: good for `uses` agents until `ttl` from now.
    pub fn create_join_token(&self, cluster: &str, ttl_ms: i64, uses: u32) -> Result<String> {
        self.insert_join_token(cluster, "", ttl_ms, uses)
    }

    /// A join token for one node a provider is bringing up (slurm, command): used
    /// once, by that node's agent, which joins as that node.
    pub fn create_node_join_token(
        &self,
        cluster: &str,
        node_id: &str,
        ttl_ms: i64,
    ) -> Result<String> {
        self.insert_join_token(cluster, node_id, ttl_ms, 1)
    }

    fn insert_join_token(
        &self,
        cluster: &str,
        node_id: &str,
        ttl_ms: i64,
        uses: u32,
    ) -> Result<String> {
        if uses == 0 {
            return Err(Error::invalid("uses", "must be at least 1"));
        }
        let id = random_hex(6);
        let secret = random_hex(24);
        let now = now_ms();
        self.sql(|sql: &mut Sql| {
            sql.execute(
                "INSERT INTO join_tokens (id, cluster, secret_sha256, expires_at, uses_left, created_at, node_id)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                &[
                    &id,
                    &cluster,
                    &sha256(&secret),
                    &now.saturating_add(ttl_ms),
                    &i64::from(uses),
                    &now,
                    &node_id,
                ],
            )
        })?;
        Ok(format!("shoal_join_{id}_{secret}"))
    }

    /// What a join token lets one more agent join, using that use up; or why not.
    pub fn use_join_token(&self, token: &str) -> std::result::Result<JoinAs, String> {
        let Some((id, secret)) = token
            .strip_prefix("shoal_join_")
            .and_then(|rest| rest.split_once('_'))
        else {
            return Err("not a join token (shoal_join_…)".into());
        };
        let used = self.sql(|sql: &mut Sql| {
            let row = sql.first(
                "SELECT cluster, secret_sha256, expires_at, uses_left, revoked_at IS NOT NULL, node_id
                 FROM join_tokens WHERE id = ?1",
                &[&id],
                |r| {
                    Ok((
                        r.get::<String>(0)?,
                        r.get::<Vec<u8>>(1)?,
                        r.get::<i64>(2)?,
                        r.get::<i64>(3)?,
                        r.get::<bool>(4)?,
                        r.get::<String>(5)?,
                    ))
                },
            )?;
            let Some((cluster, hash, expires_at, uses_left, revoked, node_id)) = row else {
                return Ok(Err("unknown join token"));
            };
            if !bool::from(sha256(secret).ct_eq(&hash)) {
                return Ok(Err("wrong join token"));
            }
            if revoked {
                return Ok(Err("revoked join token"));
            }
            if now_ms() > expires_at {
                return Ok(Err("expired join token"));
            }
            if uses_left <= 0 {
                return Ok(Err("join token used up"));
            }
            sql.execute(
                "UPDATE join_tokens SET uses_left = uses_left - 1 WHERE id = ?1",
                &[&id],
            )?;
            Ok(Ok(JoinAs {
                cluster,
                node_id: (!node_id.is_empty()).then_some(node_id),
            }))
        });
        match used {
            Ok(answer) => answer.map_err(str::to_string),
            Err(e) => Err(e.to_string()),
        }
    }

    pub fn revoke_join_token(&self, id: &str) -> Result<bool> {
        let changed = self.sql(|sql: &mut Sql| {
            sql.execute(
                "UPDATE join_tokens SET revoked_at = ?2 WHERE id = ?1 AND revoked_at IS NULL",
                &[&id, &now_ms()],
            )
        })?;
        Ok(changed > 0)
    }

    pub fn join_tokens(&self) -> Result<Vec<JoinTokenInfo>> {
        self.sql(|sql: &mut Sql| {
            sql.query(
                "SELECT id, cluster, expires_at, uses_left, revoked_at IS NOT NULL FROM join_tokens
                 WHERE node_id = '' ORDER BY created_at",
                &[],
                |r| {
                    Ok(JoinTokenInfo {
                        id: r.get(0)?,
                        cluster: r.get(1)?,
                        expires_at_ms: r.get(2)?,
                        uses_left: r.get(3)?,
                        revoked: r.get(4)?,
                    })
                },
            )
        })
    }
}

impl Auth {
    /// Identities an earlier version kept here: the user-assigned ones, and each
    /// cluster's (cluster, identity). The control loop owns them now.
    #[allow(clippy::type_complexity)]
    pub fn legacy_identities(
        &self,
    ) -> Result<(
        Vec<crate::model::Identity>,
        Vec<(String, crate::model::ClusterIdentity)>,
    )> {
        use crate::model::{ClusterIdentity, Identity, IdentityKind};
        self.with_sqlite(|conn| {
            let mut stmt = conn.prepare("SELECT name, client_id, created_at FROM identities")?;
            let users = stmt
                .query_map([], |r| {
                    Ok(Identity {
                        name: r.get(0)?,
                        client_id: r.get(1)?,
                        created_at: r.get(2)?,
                    })
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            let mut stmt =
                conn.prepare("SELECT cluster, kind, client_id FROM cluster_identities")?;
            let assigned = stmt
                .query_map([], |r| {
                    let kind: String = r.get(1)?;
                    Ok((
                        r.get::<_, String>(0)?,
                        ClusterIdentity {
                            kind: if kind == "SystemAssigned" {
                                IdentityKind::SystemAssigned
                            } else {
                                IdentityKind::UserAssigned
                            },
                            client_id: r.get(2)?,
                        },
                    ))
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok((users, assigned))
        })
    }

    /// Forgets the legacy identities, once the control loop has committed them.
    pub fn clear_legacy_identities(&self) -> Result<()> {
        self.with_sqlite(|conn| {
            conn.execute_batch("DELETE FROM identities; DELETE FROM cluster_identities;")
        })
        .map(|_| ())
    }

    /// Runs `f` on `auth.db` (what earlier versions kept there); a PostgreSQL
    /// store never had it: Ok(Default).
    fn with_sqlite<T: Default>(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T>,
    ) -> Result<T> {
        let db = self.db.lock().unwrap_or_else(|p| p.into_inner());
        match &*db {
            Database::Lite(conn) => {
                f(conn).map_err(|e| Error::Internal(format!("auth database: {e}")))
            }
            Database::Pg(_) => Ok(T::default()),
        }
    }
}

/// Opens `<data_dir>/auth.db`; with no admin token yet, makes one and writes it to
/// `<data_dir>/admin.token` (0600). Returns the new token, if it made one.
pub fn bootstrap(data_dir: &Path) -> Result<Option<String>> {
    std::fs::create_dir_all(data_dir)
        .map_err(|e| Error::Internal(format!("data dir {}: {e}", data_dir.display())))?;
    bootstrap_with(&Auth::open(&data_dir.join("auth.db"))?, data_dir)
}

/// With no admin token in `auth` yet, makes one and writes it to
/// `<data_dir>/admin.token` (0600). Returns the new token, if it made one.
pub fn bootstrap_with(auth: &Auth, data_dir: &Path) -> Result<Option<String>> {
    std::fs::create_dir_all(data_dir)
        .map_err(|e| Error::Internal(format!("data dir {}: {e}", data_dir.display())))?;
    if auth.has_admin() {
        return Ok(None);
    }
    let token = auth.create_token(Role::Admin, "made by shoal up for the local user")?;
    let path = data_dir.join("admin.token");
    write_secret(&path, &token)?;
    Ok(Some(token))
}

/// Writes a secret readable by its owner only.
pub fn write_secret(path: &Path, secret: &str) -> Result<()> {
    use std::io::Write;
    #[cfg(unix)]
    use std::os::unix::fs::OpenOptionsExt;
    let io = |e: std::io::Error| Error::Internal(format!("{}: {e}", path.display()));
    let mut options = std::fs::OpenOptions::new();
    options.create(true).write(true).truncate(true);
    #[cfg(unix)]
    options.mode(0o600);
    let mut file = options.open(path).map_err(io)?;
    file.write_all(secret.as_bytes()).map_err(io)?;
    file.write_all(b"\n").map_err(io)
}

/// What a request needs, from its path (and method, for HTTP).
#[derive(Debug, PartialEq, Eq)]
pub enum Needs {
    Nothing,
    Node,
    Role(Role),
}

/// The access rule of every endpoint.
pub fn needs(path: &str, method: &axum::http::Method) -> Needs {
    use axum::http::Method;
    // Join presents a join token of its own (checked by the handler).
    if path == "/healthz" || path == "/.well-known/jwks.json" || path == "/shoal.v1.Agent/Join" {
        return Needs::Nothing;
    }
    // The studio signs people in with a session of its own (`studio::require_session`),
    // whose actions are checked against these same rules; `/` only redirects to it.
    if path == "/" || path == "/studio" || path.starts_with("/studio/") {
        return Needs::Nothing;
    }
    if let Some(rpc) = path.strip_prefix("/shoal.v1.") {
        let (service, call) = rpc.split_once('/').unwrap_or((rpc, ""));
        return match (service, call) {
            ("Agent", _) => Needs::Node,
            ("Clusters", "Get" | "List" | "Watch")
            | ("Jobs", "Get" | "List" | "Watch" | "Logs" | "Why" | "DownloadOutputs" | "Metrics")
            | ("Datastores" | "DataAssets" | "Environments" | "Components", "Get" | "List")
            | ("Settings", "GetDefaults")
            | ("Nodes", "List")
            | ("VmSizes", _)
            | ("Identities", "List" | "Get")
            | ("Quotas", "Get") => Needs::Role(Role::Reader),
            ("Jobs", "Submit" | "Create" | "Cancel" | "Delete")
            | ("DataAssets", "Create")
            | ("Environments", "Create" | "Archive")
            | ("Components", "Create") => Needs::Role(Role::User),
            _ => Needs::Role(Role::Admin),
        };
    }
    // Tokens are an admin's, listing them too (as `Tokens.List`).
    if path.starts_with("/api/v1/tokens") {
        return Needs::Role(Role::Admin);
    }
    if method == Method::GET || method == Method::HEAD {
        return Needs::Role(Role::Reader);
    }
    // MLflow's tracking API: its searches are POSTs that only read.
    if path.starts_with("/api/2.0/mlflow") {
        return if path.ends_with("/search") {
            Needs::Role(Role::Reader)
        } else {
            Needs::Role(Role::User)
        };
    }
    // What a job file names to upload: asked before each submission.
    if path.starts_with("/api/v1/jobs")
        || path == "/api/v1/local-paths"
        || path.starts_with("/api/v1/data")
        || path.starts_with("/api/v1/environments")
        || path.starts_with("/api/v1/components")
    {
        // `/api/v1/datastores` is an admin's (they are folders of this machine).
        if !path.starts_with("/api/v1/datastores") {
            return Needs::Role(Role::User);
        }
    }
    Needs::Role(Role::Admin)
}

/// The bearer token of a request's `authorization` header.
pub fn bearer(headers: &axum::http::HeaderMap) -> Option<&str> {
    headers
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::Method;

    /// Each test runs on `auth.db` (SQLite) and on a fresh PostgreSQL database.
    fn on_both(test: fn(Auth)) {
        test(Auth::in_memory().expect("auth"));
        test(Auth::postgres(&crate::db::test_postgres()).expect("auth in postgres"));
    }

    #[test]
    fn tokens_verify_until_revoked_and_only_with_their_secret() {
        on_both(tokens_verify_until_revoked_and_only_with_their_secret_in);
    }

    fn tokens_verify_until_revoked_and_only_with_their_secret_in(auth: Auth) {
        let token = auth.create_token(Role::User, "ci").expect("token");
        let Principal::Person { role, token_id } = auth.verify(&token).expect("valid") else {
            panic!("a person");
        };
        assert_eq!(role, Role::User);
        let forged = format!("{}x", &token[..token.len() - 1]);
        assert_eq!(auth.verify(&forged), Err("wrong token"));
        assert_eq!(auth.verify("shoal_nope_nope"), Err("unknown token"));
        assert_eq!(auth.verify("Basic abc"), Err("not a Shoal token"));
        assert!(auth.revoke(&token_id).expect("revoke"));
        assert_eq!(auth.verify(&token), Err("revoked token"));
    }

    #[test]
    fn revoked_tokens_are_forgotten_after_the_retention() {
        on_both(revoked_tokens_are_forgotten_after_the_retention_in);
    }

    fn revoked_tokens_are_forgotten_after_the_retention_in(auth: Auth) {
        let old = auth.node_credential("n1").expect("credential");
        auth.revoke_node("n1").expect("revoke");
        let kept = auth.create_token(Role::User, "ci").expect("token");
        assert_eq!(auth.verify(&old), Err("revoked token"));
        assert_eq!(auth.purge_revoked(now_ms() + 1).expect("purge"), 1);
        assert_eq!(auth.verify(&old), Err("unknown token"));
        assert!(auth.verify(&kept).is_ok(), "live tokens stay");
        assert_eq!(auth.list().expect("list").len(), 1);
    }

    #[test]
    fn a_node_credential_names_its_node_and_replaces_the_last_one() {
        on_both(a_node_credential_names_its_node_and_replaces_the_last_one_in);
    }

    #[test]
    fn join_tokens_are_used_up_expire_and_bind_a_node() {
        on_both(join_tokens_are_used_up_expire_and_bind_a_node_in);
    }

    fn join_tokens_are_used_up_expire_and_bind_a_node_in(auth: Auth) {
        let twice = auth.create_join_token("c", 60_000, 2).expect("token");
        for _ in 0..2 {
            assert_eq!(
                auth.use_join_token(&twice),
                Ok(JoinAs {
                    cluster: "c".into(),
                    node_id: None
                })
            );
        }
        assert_eq!(
            auth.use_join_token(&twice),
            Err("join token used up".into())
        );
        let expired = auth.create_join_token("c", -1, 1).expect("token");
        assert_eq!(
            auth.use_join_token(&expired),
            Err("expired join token".into())
        );
        let bound = auth
            .create_node_join_token("c", "c-n7", 60_000)
            .expect("token");
        assert_eq!(
            auth.use_join_token(&bound)
                .expect("joins")
                .node_id
                .as_deref(),
            Some("c-n7")
        );
        let listed = auth.join_tokens().expect("list");
        assert_eq!(listed.len(), 2, "node-bound tokens are not listed");
        assert!(auth.revoke_join_token(&listed[0].id).expect("revoke"));
        // What was committed is what a second coordinator reads.
        auth.reload().expect("reload");
        assert!(auth.join_tokens().expect("list")[0].revoked);
    }

    fn a_node_credential_names_its_node_and_replaces_the_last_one_in(auth: Auth) {
        let first = auth.node_credential("n1").expect("credential");
        let second = auth.node_credential("n1").expect("credential");
        assert_eq!(
            auth.verify(&second),
            Ok(Principal::Node {
                node_id: "n1".into()
            })
        );
        assert_eq!(auth.verify(&first), Err("revoked token"));
    }

    #[test]
    fn every_endpoint_has_a_rule() {
        assert_eq!(needs("/healthz", &Method::GET), Needs::Nothing);
        assert_eq!(needs("/shoal.v1.Agent/Session", &Method::POST), Needs::Node);
        assert_eq!(
            needs("/shoal.v1.Jobs/DownloadOutputs", &Method::POST),
            Needs::Role(Role::Reader),
            "agents restore through Agent/RestoreOutputs, checked per instance"
        );
        assert_eq!(
            needs("/shoal.v1.Jobs/Submit", &Method::POST),
            Needs::Role(Role::User)
        );
        assert_eq!(
            needs("/shoal.v1.Jobs/Logs", &Method::POST),
            Needs::Role(Role::Reader)
        );
        assert_eq!(
            needs("/shoal.v1.Clusters/Create", &Method::POST),
            Needs::Role(Role::Admin)
        );
        assert_eq!(
            needs("/shoal.v1.Clusters/Delete", &Method::POST),
            Needs::Role(Role::Admin)
        );
        assert_eq!(
            needs("/shoal.v1.Tokens/Create", &Method::POST),
            Needs::Role(Role::Admin)
        );
        assert_eq!(
            needs("/api/v1/jobs", &Method::POST),
            Needs::Role(Role::User)
        );
        assert_eq!(
            needs("/api/v1/local-paths", &Method::POST),
            Needs::Role(Role::User)
        );
        assert_eq!(
            needs("/api/v1/clusters/x", &Method::DELETE),
            Needs::Role(Role::Admin)
        );
        for (path, method) in [
            ("/api/v1/tokens", Method::GET),
            ("/api/v1/tokens", Method::POST),
            ("/api/v1/quotas", Method::PUT),
            ("/api/v1/clusters/x/lock", Method::PUT),
            ("/api/v1/nodes/n1/preempt", Method::POST),
            ("/api/v1/identities", Method::POST),
            ("/api/v1/clusters/x/identities", Method::POST),
            ("/api/v1/clusters/x/identities/%5Bsystem%5D", Method::DELETE),
        ] {
            assert_eq!(needs(path, &method), Needs::Role(Role::Admin), "{path}");
        }
        assert_eq!(needs("/metrics", &Method::GET), Needs::Role(Role::Reader));
        assert_eq!(
            needs("/api/2.0/mlflow/runs/search", &Method::POST),
            Needs::Role(Role::Reader)
        );
        assert_eq!(
            needs("/api/2.0/mlflow/runs/log-batch", &Method::POST),
            Needs::Role(Role::User)
        );
        assert_eq!(
            needs(
                "/api/2.0/mlflow-artifacts/artifacts/1/r/artifacts/a.txt",
                &Method::PUT
            ),
            Needs::Role(Role::User)
        );
        assert_eq!(
            needs("/shoal.v1.Unknown/Thing", &Method::POST),
            Needs::Role(Role::Admin)
        );
    }
}
