//! Managed identity: identities are objects (user-assigned, made with
//! `shoal identity create`; or a cluster's own, system-assigned); a cluster lists
//! the ones its jobs may use. A job asks its node's agent for a token; the
//! coordinator signs it (EdDSA, a key made on first start in the data dir) and
//! publishes the public key as JWKS at `/.well-known/jwks.json`.

use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::signature::{Ed25519KeyPair, KeyPair};
use serde::Serialize;

use crate::model::IdentityKind;
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
        Self::from_pkcs8(pkcs8, owner, &path.display().to_string())
    }

    /// The coordinators of one PostgreSQL store are one to the outside: the
    /// first to start offers its id (`owner`) and signing key (`<data_dir>/identity.key`),
    /// and each uses the ones the database holds, so the tokens a leader
    /// issued verify, by the same issuer and JWKS, after a standby takes over.
    /// The store's migrations have made the table.
    pub fn shared(url: &str, owner: &str, data_dir: &Path) -> Result<(String, Self)> {
        let local = Self::load_or_create(data_dir, owner)?;
        let mut conn = crate::db::PgConnection::connect(url)?;
        let (owner, pkcs8) = conn.transaction(|sql| {
            sql.execute(
                "INSERT INTO shoal_identity (id, owner, signing_key) VALUES (0, ?1, ?2)
                 ON CONFLICT DO NOTHING",
                &[&owner, &local.pkcs8],
            )?;
            sql.first(
                "SELECT owner, signing_key FROM shoal_identity WHERE id = 0",
                &[],
                |r| Ok((r.get::<String>(0)?, r.get::<Vec<u8>>(1)?)),
            )?
            .ok_or_else(|| Error::Internal("the database holds no coordinator id".into()))
        })?;
        let signer = Self::from_pkcs8(pkcs8, &owner, "the database's signing key")?;
        Ok((owner, signer))
    }

    fn from_pkcs8(pkcs8: Vec<u8>, owner: &str, from: &str) -> Result<Self> {
        let pair = Ed25519KeyPair::from_pkcs8(&pkcs8)
            .map_err(|_| Error::Internal(format!("{from}: not an Ed25519 key")))?;
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

/// An identity a cluster may use, with its name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Assigned {
    pub kind: IdentityKind,
    pub client_id: String,
    /// The user-assigned identity's name; the cluster's name for its own.
    pub name: String,
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn the_coordinators_of_one_database_share_the_first_ones_id_and_key() {
        let url = crate::db::test_postgres();
        // The store makes the table.
        drop(crate::store::SqlStore::connect_postgres(&url).expect("store"));
        let (a, b) = (
            tempfile::tempdir().expect("a"),
            tempfile::tempdir().expect("b"),
        );
        let (first_owner, first) = Signer::shared(&url, "first", a.path()).expect("first");
        let (second_owner, second) = Signer::shared(&url, "second", b.path()).expect("second");
        assert_eq!(
            (first_owner.as_str(), second_owner.as_str()),
            ("first", "first")
        );
        assert_eq!(second.jwks(), first.jwks());
        assert_eq!(second.issuer(), "shoal:first");
        let own = Signer::load_or_create(b.path(), "second").expect("its own file");
        assert_ne!(
            own.kid, first.kid,
            "each data dir made a key; the first one's is used"
        );
    }
}
