//! Managed identity: identities are objects (user-assigned, made with
//! `shoal identity create`; or a cluster's own, system-assigned); a cluster lists
//! the ones its jobs may use. A job asks its node's agent for a token; the
//! coordinator signs it (EdDSA, a key made on first start in the data dir) and
//! publishes the public key as JWKS at `/.well-known/jwks.json`.

use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::signature::{Ed25519KeyPair, KeyPair};
use rusqlite::params;
use serde::Serialize;

use crate::auth::Auth;
use crate::{Error, Result};

/// How long an issued token is good for.
pub const TOKEN_SECONDS: i64 = 3600;

/// The coordinator's signing key.
#[derive(Clone)]
pub struct Signer {
    pkcs8: Vec<u8>,
    public: Vec<u8>,
    kid: String,
    issuer: String,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Signer {{ kid: {} }}", self.kid)
    }
}

#[derive(Serialize)]
struct Claims<'a> {
    iss: &'a str,
    sub: &'a str,
    aud: &'a str,
    iat: i64,
    nbf: i64,
    exp: i64,
    cluster: &'a str,
    job: &'a str,
    attempt: &'a str,
    identity_type: &'a str,
}

/// A token for a job.
#[derive(Debug)]
pub struct Issued {
    pub access_token: String,
    pub expires_on: i64,
}

impl Signer {
    /// The key in `<data_dir>/identity.key` (PKCS#8, 0600), made on first use.
    pub fn load_or_create(data_dir: &Path, owner: &str) -> Result<Self> {
        let path = data_dir.join("identity.key");
        let pkcs8 = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(_) => {
                let rng = ring::rand::SystemRandom::new();
                let doc = Ed25519KeyPair::generate_pkcs8(&rng)
                    .map_err(|_| Error::Internal("cannot make a signing key".into()))?;
                let bytes = doc.as_ref().to_vec();
                write_private(&path, &bytes)?;
                bytes
            }
        };
        let pair = Ed25519KeyPair::from_pkcs8(&pkcs8)
            .map_err(|_| Error::Internal(format!("{}: not an Ed25519 key", path.display())))?;
        let public = pair.public_key().as_ref().to_vec();
        let kid = URL_SAFE_NO_PAD
            .encode(&ring::digest::digest(&ring::digest::SHA256, &public).as_ref()[..12]);
        Ok(Signer {
            pkcs8,
            public,
            kid,
            issuer: format!("shoal:{owner}"),
        })
    }

    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// The JWKS document with the public key.
    pub fn jwks(&self) -> serde_json::Value {
        serde_json::json!({
            "keys": [{
                "kty": "OKP",
                "crv": "Ed25519",
                "x": URL_SAFE_NO_PAD.encode(&self.public),
                "kid": self.kid,
                "alg": "EdDSA",
                "use": "sig",
            }]
        })
    }

    #[allow(clippy::too_many_arguments)]
    pub fn issue(
        &self,
        client_id: &str,
        identity_type: &str,
        resource: &str,
        cluster: &str,
        job: &str,
        attempt: &str,
        now_seconds: i64,
    ) -> Result<Issued> {
        let exp = now_seconds + TOKEN_SECONDS;
        let claims = Claims {
            iss: &self.issuer,
            sub: client_id,
            aud: resource,
            iat: now_seconds,
            nbf: now_seconds,
            exp,
            cluster,
            job,
            attempt,
            identity_type,
        };
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::EdDSA);
        header.kid = Some(self.kid.clone());
        let key = jsonwebtoken::EncodingKey::from_ed_der(&self.pkcs8);
        let access_token = jsonwebtoken::encode(&header, &claims, &key)
            .map_err(|e| Error::Internal(format!("cannot sign a token: {e}")))?;
        Ok(Issued {
            access_token,
            expires_on: exp,
        })
    }
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let io = |e: std::io::Error| Error::Internal(format!("{}: {e}", path.display()));
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(io)?;
    file.write_all(bytes).map_err(io)
}

/// An identity a cluster may use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Assigned {
    /// `SystemAssigned` or `UserAssigned`.
    pub kind: &'static str,
    pub client_id: String,
    /// The user-assigned identity's name; the cluster's name for its own.
    pub name: String,
}

impl Auth {
    /// A user-assigned identity; its client id.
    pub fn create_identity(&self, name: &str) -> Result<String> {
        if name.is_empty()
            || name.len() > 64
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(Error::invalid(
                "name",
                format!("`{name}`: 1 to 64 letters, digits, - or _"),
            ));
        }
        let client_id = new_client_id();
        self.with_conn(|conn| {
            conn.execute(
                "INSERT INTO identities (name, client_id, created_at) VALUES (?1, ?2, ?3)",
                params![name, client_id, crate::auth::now_ms()],
            )
        })
        .map_err(|e| match e {
            Error::Internal(text) if text.contains("UNIQUE") => {
                Error::AlreadyExists(format!("identity `{name}` exists"))
            }
            other => other,
        })?;
        Ok(client_id)
    }

    /// User-assigned identities: (name, client id).
    pub fn identities(&self) -> Result<Vec<(String, String)>> {
        self.with_conn(|conn| {
            let mut stmt = conn.prepare("SELECT name, client_id FROM identities ORDER BY name")?;
            let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
            rows.collect()
        })
    }

    /// Assigns the cluster its own identity (`[system]`) or a user-assigned one
    /// (by name or client id); the client id.
    pub fn assign_identity(&self, cluster: &str, which: &str) -> Result<String> {
        if which == "[system]" || which.eq_ignore_ascii_case("system") {
            if let Some(existing) = self
                .cluster_identities(cluster)?
                .into_iter()
                .find(|a| a.kind == "SystemAssigned")
            {
                return Ok(existing.client_id);
            }
            let client_id = new_client_id();
            self.with_conn(|conn| {
                conn.execute(
                    "INSERT INTO cluster_identities (cluster, kind, client_id) VALUES (?1, 'SystemAssigned', ?2)",
                    params![cluster, client_id],
                )
            })?;
            return Ok(client_id);
        }
        let client_id = self
            .identities()?
            .into_iter()
            .find(|(name, id)| name == which || id == which)
            .map(|(_, id)| id)
            .ok_or_else(|| {
                Error::NotFound(format!(
                    "no identity `{which}`; make one with `shoal identity create {which}`"
                ))
            })?;
        self.with_conn(|conn| {
            conn.execute(
                "INSERT OR IGNORE INTO cluster_identities (cluster, kind, client_id) VALUES (?1, 'UserAssigned', ?2)",
                params![cluster, client_id],
            )
        })?;
        Ok(client_id)
    }

    /// Takes an identity away from the cluster (`[system]`, a name or a client id).
    pub fn remove_identity(&self, cluster: &str, which: &str) -> Result<()> {
        let assigned = self.cluster_identities(cluster)?;
        let found = assigned.iter().find(|a| {
            ((which == "[system]" || which.eq_ignore_ascii_case("system"))
                && a.kind == "SystemAssigned")
                || a.client_id == which
                || (a.kind == "UserAssigned" && a.name == which)
        });
        let Some(found) = found else {
            return Err(Error::NotFound(format!(
                "cluster `{cluster}` has no identity `{which}`"
            )));
        };
        let client_id = found.client_id.clone();
        self.with_conn(|conn| {
            conn.execute(
                "DELETE FROM cluster_identities WHERE cluster = ?1 AND client_id = ?2",
                params![cluster, client_id],
            )
        })?;
        Ok(())
    }

    /// The identities a cluster's jobs may use; the system-assigned one first.
    pub fn cluster_identities(&self, cluster: &str) -> Result<Vec<Assigned>> {
        let named = self.identities()?;
        let rows: Vec<(String, String)> = self.with_conn(|conn| {
            let mut stmt = conn.prepare(
                "SELECT kind, client_id FROM cluster_identities WHERE cluster = ?1 ORDER BY kind, client_id",
            )?;
            let rows = stmt.query_map([cluster], |r| Ok((r.get(0)?, r.get(1)?)))?;
            rows.collect()
        })?;
        Ok(rows
            .into_iter()
            .map(|(kind, client_id)| {
                let system = kind == "SystemAssigned";
                Assigned {
                    kind: if system {
                        "SystemAssigned"
                    } else {
                        "UserAssigned"
                    },
                    name: if system {
                        cluster.to_string()
                    } else {
                        named
                            .iter()
                            .find(|(_, id)| *id == client_id)
                            .map(|(n, _)| n.clone())
                            .unwrap_or_default()
                    },
                    client_id,
                }
            })
            .collect())
    }
}

fn new_client_id() -> String {
    let mut bytes = [0u8; 16];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut bytes);
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clusters_get_system_and_user_identities_and_lose_them() {
        let auth = Auth::in_memory().expect("auth");
        let id = auth.create_identity("reader-bot").expect("identity");
        assert!(
            auth.create_identity("reader-bot").is_err(),
            "names are unique"
        );
        let system = auth.assign_identity("gpu", "[system]").expect("system");
        assert_eq!(
            auth.assign_identity("gpu", "[system]").expect("again"),
            system
        );
        assert_eq!(auth.assign_identity("gpu", "reader-bot").expect("user"), id);
        let assigned = auth.cluster_identities("gpu").expect("list");
        assert_eq!(assigned[0].kind, "SystemAssigned");
        assert_eq!(assigned[1].name, "reader-bot");
        assert!(auth.cluster_identities("cpu").expect("list").is_empty());
        auth.remove_identity("gpu", "[system]").expect("removed");
        assert_eq!(auth.cluster_identities("gpu").expect("list").len(), 1);
        assert!(auth.assign_identity("gpu", "nobody").is_err());
    }

    #[test]
    fn tokens_verify_against_the_published_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let signer = Signer::load_or_create(dir.path(), "owner").expect("signer");
        let again = Signer::load_or_create(dir.path(), "owner").expect("kept");
        assert_eq!(signer.kid, again.kid);
        let now = 1_800_000_000;
        let issued = signer
            .issue(
                "client-1",
                "SystemAssigned",
                "https://storage",
                "gpu",
                "job-1",
                "job-1.1",
                now,
            )
            .expect("token");
        let jwks = signer.jwks();
        let x = jwks["keys"][0]["x"].as_str().expect("x");
        let key = jsonwebtoken::DecodingKey::from_ed_components(x).expect("key");
        let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::EdDSA);
        validation.set_audience(&["https://storage"]);
        validation.validate_exp = false;
        let data =
            jsonwebtoken::decode::<serde_json::Value>(&issued.access_token, &key, &validation)
                .expect("valid");
        assert_eq!(data.claims["sub"], "client-1");
        assert_eq!(data.claims["exp"], now + TOKEN_SECONDS);
        validation.set_audience(&["https://elsewhere"]);
        assert!(
            jsonwebtoken::decode::<serde_json::Value>(&issued.access_token, &key, &validation)
                .is_err()
        );
    }
}
