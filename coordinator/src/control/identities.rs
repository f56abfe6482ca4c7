//! Managed identities in the control loop: the user-assigned identities, and each
//! cluster's list of the ones its jobs may use. A cluster's list lives in its own
//! row, so it is made with the cluster (one transaction) and goes with it.

use super::*;
use crate::identity::Assigned;
use crate::model::{ClusterIdentity, Identity, IdentityKind, identity_name_of, is_system_identity};

/// A random client id, shaped like the managed service's (a UUID).
fn new_client_id(rng: &mut rand::rngs::StdRng) -> String {
    let hex = super::random_hex(rng, 16);
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

impl Control {
    pub(super) fn create_identity(&mut self, name: &str, now: Millis) -> Result<Identity> {
        crate::model::validate_identity_name(name)?;
        if self.identities.contains_key(name) {
            return Err(Error::AlreadyExists(format!("identity `{name}` exists")));
        }
        let identity = Identity {
            name: name.to_string(),
            client_id: new_client_id(&mut self.rng),
            created_at: now,
        };
        info!(identity = name, client_id = %identity.client_id, "identity created");
        self.identities.insert(name.to_string(), identity.clone());
        self.new_identities.push(identity.clone());
        Ok(identity)
    }

    pub(super) fn list_identities(&self) -> Vec<Identity> {
        self.identities.values().cloned().collect()
    }

    /// The user-assigned identity `which` names (name, client id or resource id).
    fn user_identity(&self, which: &str) -> Result<&Identity> {
        let name = identity_name_of(which);
        self.identities
            .get(name)
            .or_else(|| self.identities.values().find(|i| i.client_id == which))
            .ok_or_else(|| {
                Error::NotFound(format!(
                    "no identity `{which}`; make one with `shoal identity create {name}`"
                ))
            })
    }

    /// `current` with the identities `wanted` added (each once); the system-assigned
    /// one first. Nothing is changed when one of them is unknown.
    pub(super) fn with_identities(
        &mut self,
        current: &[ClusterIdentity],
        wanted: &[String],
    ) -> Result<Vec<ClusterIdentity>> {
        let mut list = current.to_vec();
        for which in wanted {
            let which = which.trim();
            let entry = if is_system_identity(which) {
                if list.iter().any(|i| i.kind == IdentityKind::SystemAssigned) {
                    continue;
                }
                ClusterIdentity {
                    kind: IdentityKind::SystemAssigned,
                    client_id: new_client_id(&mut self.rng),
                }
            } else {
                let identity = self.user_identity(which)?;
                if list.iter().any(|i| i.client_id == identity.client_id) {
                    continue;
                }
                ClusterIdentity {
                    kind: IdentityKind::UserAssigned,
                    client_id: identity.client_id.clone(),
                }
            };
            list.push(entry);
        }
        list.sort_by_key(|a| a.kind);
        Ok(list)
    }

    /// The cluster's identities with their names (a system-assigned one is named
    /// after the cluster).
    pub(super) fn assigned(&self, cluster: &Cluster) -> Vec<Assigned> {
        cluster
            .identities
            .iter()
            .map(|i| Assigned {
                kind: i.kind,
                client_id: i.client_id.clone(),
                name: match i.kind {
                    IdentityKind::SystemAssigned => cluster.spec.name.clone(),
                    IdentityKind::UserAssigned => self
                        .identities
                        .values()
                        .find(|u| u.client_id == i.client_id)
                        .map(|u| u.name.clone())
                        .unwrap_or_default(),
                },
            })
            .collect()
    }

    fn updatable(&self, name: &str) -> Result<&Cluster> {
        let cluster = self.cluster(name)?;
        if cluster.lock == Some(LockKind::ReadOnly) {
            return Err(Error::FailedPrecondition(format!(
                "cluster `{name}` is locked read-only; `shoal cluster unlock {name}` first"
            )));
        }
        Ok(cluster)
    }

    pub(super) fn assign_identity(&mut self, cluster: &str, which: &str) -> Result<ClusterInfo> {
        let current = self.updatable(cluster)?.identities.clone();
        let next = self.with_identities(&current, &[which.to_string()])?;
        self.set_identities(cluster, next);
        self.cluster_info(cluster)
    }

    pub(super) fn remove_identity(&mut self, cluster: &str, which: &str) -> Result<ClusterInfo> {
        let current = &self.updatable(cluster)?.identities;
        let user = self.identities.get(identity_name_of(which));
        let found = current.iter().position(|a| {
            (is_system_identity(which) && a.kind == IdentityKind::SystemAssigned)
                || a.client_id == which
                || user.is_some_and(|u| u.client_id == a.client_id)
        });
        let Some(found) = found else {
            return Err(Error::NotFound(format!(
                "cluster `{cluster}` has no identity `{which}`"
            )));
        };
        let mut next = current.clone();
        next.remove(found);
        self.set_identities(cluster, next);
        self.cluster_info(cluster)
    }

    fn set_identities(&mut self, cluster: &str, identities: Vec<ClusterIdentity>) {
        if let Some(c) = self.clusters.get_mut(cluster) {
            info!(cluster, identities = identities.len(), "identities changed");
            c.identities = identities;
            self.dirty_clusters.insert(cluster.to_string());
        }
    }

    /// Identities an earlier version kept beside the tokens (in `auth.db`), brought
    /// under the loop's state; the batch to commit now. Clusters that no longer
    /// exist drop theirs.
    pub fn import_identities(
        &mut self,
        users: Vec<Identity>,
        assignments: Vec<(String, ClusterIdentity)>,
    ) -> crate::store::Batch {
        let mut batch = crate::store::Batch::default();
        for user in users {
            if !self.identities.contains_key(&user.name) {
                self.identities.insert(user.name.clone(), user.clone());
                batch.identities.push(user);
            }
        }
        for (name, assignment) in assignments {
            if let Some(cluster) = self.clusters.get_mut(&name)
                && !cluster
                    .identities
                    .iter()
                    .any(|i| i.client_id == assignment.client_id)
            {
                cluster.identities.push(assignment);
                cluster.identities.sort_by_key(|a| a.kind);
                batch.clusters.push(cluster.clone());
            }
        }
        info!(
            identities = batch.identities.len(),
            clusters = batch.clusters.len(),
            "identities imported from auth.db"
        );
        batch
    }
}
