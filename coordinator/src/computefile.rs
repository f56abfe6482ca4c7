//! The managed service's compute (amlCompute) YAML: every key of its schema is
//! read; the ones that cannot mean anything here (a region, SSH and network
//! settings) are accepted with a warning that says why. Unknown keys are errors,
//! so a typo never passes as a default.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value;

use crate::model::ClusterRequest;
use crate::{Error, Result};

/// The service's default VM size for a compute file that names none.
pub const DEFAULT_SIZE: &str = "Standard_DS3_v2";

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ComputeFile {
    #[serde(rename = "$schema", default)]
    pub schema: Option<String>,
    #[serde(rename = "type", default)]
    pub kind: Option<String>,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default, alias = "vm_size")]
    pub size: Option<String>,
    #[serde(default, alias = "min_nodes")]
    pub min_instances: Option<u32>,
    #[serde(default, alias = "max_nodes")]
    pub max_instances: Option<u32>,
    #[serde(default, alias = "vm_priority")]
    pub tier: Option<String>,
    #[serde(default, alias = "idle_seconds_before_scaledown")]
    pub idle_time_before_scale_down: Option<u64>,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    #[serde(default)]
    pub identity: Option<IdentitySection>,
    // Accepted, with a warning: no meaning here.
    #[serde(default)]
    pub location: Option<String>,
    #[serde(default)]
    pub ssh_public_access_enabled: Option<bool>,
    #[serde(default)]
    pub ssh_settings: Option<Value>,
    #[serde(default)]
    pub admin_username: Option<String>,
    #[serde(default)]
    pub network_settings: Option<Value>,
    #[serde(default)]
    pub enable_node_public_ip: Option<bool>,
    // Shoal's own.
    #[serde(default)]
    pub provider: Option<String>,
    /// The provider's own settings (slurm: partition, …; command: its scripts).
    #[serde(default)]
    pub provider_settings: BTreeMap<String, String>,
    #[serde(default)]
    pub internode_communication: Option<bool>,
}

/// `identity: {type: system_assigned | user_assigned, user_assigned_identities: [{resource_id: …}]}`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentitySection {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub user_assigned_identities: Vec<UserAssigned>,
}

/// `{resource_id: /subscriptions/…/userAssignedIdentities/NAME}`, `{client_id: …}`,
/// or the name alone.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum UserAssigned {
    Named(String),
    Ids {
        #[serde(default)]
        resource_id: Option<String>,
        #[serde(default)]
        client_id: Option<String>,
        #[serde(default)]
        principal_id: Option<String>,
    },
}

impl IdentitySection {
    /// What to assign: `[system]` and the user-assigned ones, as named.
    pub fn assigned(&self) -> Result<Vec<String>> {
        let kinds: Vec<String> = self
            .kind
            .split(',')
            .map(|k| k.trim().to_ascii_lowercase().replace('_', ""))
            .collect();
        let system = kinds.iter().any(|k| k == "systemassigned");
        let user = kinds.iter().any(|k| k == "userassigned");
        if let Some(other) = kinds
            .iter()
            .find(|k| !matches!(k.as_str(), "systemassigned" | "userassigned" | "none"))
        {
            return Err(Error::invalid(
                "identity.type",
                format!(
                    "`{other}` is not system_assigned, user_assigned or system_assigned,user_assigned"
                ),
            ));
        }
        let mut named = Vec::new();
        if system {
            named.push("[system]".to_string());
        }
        for (i, id) in self.user_assigned_identities.iter().enumerate() {
            let which = match id {
                UserAssigned::Named(name) => Some(name.clone()),
                UserAssigned::Ids {
                    resource_id,
                    client_id,
                    ..
                } => resource_id.clone().or_else(|| client_id.clone()),
            };
            let which = which.ok_or_else(|| {
                Error::invalid(
                    format!("identity.user_assigned_identities[{i}]"),
                    "give its resource_id (…/userAssignedIdentities/NAME) or client_id",
                )
            })?;
            named.push(which);
        }
        match (user, self.user_assigned_identities.is_empty()) {
            (true, true) => Err(Error::invalid(
                "identity.user_assigned_identities",
                "type user_assigned needs the identities: [{resource_id: …/userAssignedIdentities/NAME}]",
            )),
            (false, false) => Err(Error::invalid(
                "identity.type",
                "user_assigned_identities go with type user_assigned (or system_assigned,user_assigned)",
            )),
            _ => Ok(named),
        }
    }
}

impl ComputeFile {
    pub fn from_yaml(text: &str) -> Result<Self> {
        let file: ComputeFile = serde_saphyr::from_str(text)
            .map_err(|e| Error::invalid("compute file", e.to_string()))?;
        if let Some(kind) = file.kind.as_deref()
            && !kind.eq_ignore_ascii_case("amlcompute")
        {
            return Err(Error::invalid(
                "type",
                format!("`{kind}` computes are not supported; use `amlcompute`"),
            ));
        }
        Ok(file)
    }

    /// Keys accepted that have no effect here, each with why.
    pub fn warnings(&self) -> Vec<String> {
        let mut warnings = Vec::new();
        let mut no_effect = |key: &str, why: &str| warnings.push(format!("{key}: {why}"));
        if self.location.is_some() {
            no_effect(
                "location",
                "nodes run where their agents run; a region has no effect here",
            );
        }
        if self.ssh_public_access_enabled.is_some()
            || self.ssh_settings.is_some()
            || self.admin_username.is_some()
        {
            no_effect(
                "ssh_public_access_enabled, ssh_settings, admin_username",
                "nodes are reached through their agents, not SSH; follow jobs with `shoal job logs -f`",
            );
        }
        if self.network_settings.is_some() || self.enable_node_public_ip.is_some() {
            no_effect(
                "network_settings, enable_node_public_ip",
                "nodes use the network of the machine or Docker network they run on",
            );
        }
        warnings
    }

    /// The cluster it asks for (flags given beside the file are laid over it);
    /// the size defaults to the service's, Standard_DS3_v2.
    pub fn into_request(self) -> Result<ClusterRequest> {
        let identities = match &self.identity {
            Some(identity) => identity.assigned()?,
            None => Vec::new(),
        };
        Ok(ClusterRequest {
            name: self.name.unwrap_or_default(),
            vm_size: self.size.unwrap_or_else(|| DEFAULT_SIZE.to_string()),
            vm_priority: self.tier.unwrap_or_default(),
            min_nodes: self.min_instances,
            max_nodes: self.max_instances,
            idle_seconds_before_scaledown: self.idle_time_before_scale_down,
            description: self.description.unwrap_or_default(),
            tags: self.tags,
            provider: self.provider.unwrap_or_default(),
            provider_settings: self.provider_settings,
            internode_communication: self.internode_communication,
            identities,
            ..Default::default()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_whole_schema_is_read_and_what_means_nothing_is_named() {
        let file = ComputeFile::from_yaml(
            "$schema: https://azuremlschemas.azureedge.net/latest/amlCompute.schema.json\n\
             name: cpu\ntype: amlcompute\nlocation: westeurope\n\
             min_instances: 0\nmax_instances: 2\ntier: low_priority\n\
             ssh_public_access_enabled: false\nssh_settings: {admin_username: azureuser}\n\
             network_settings: {vnet_name: v, subnet: s}\nenable_node_public_ip: false\n\
             identity:\n  type: system_assigned,user_assigned\n  user_assigned_identities:\n    \
             - resource_id: /subscriptions/0/resourceGroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/reader-bot\n",
        )
        .expect("accepted");
        assert_eq!(file.warnings().len(), 3, "{:?}", file.warnings());
        let request = file.into_request().expect("a request");
        assert_eq!(request.vm_size, DEFAULT_SIZE);
        assert_eq!(request.vm_priority, "low_priority");
        assert_eq!(request.identities.len(), 2);
        assert_eq!(request.identities[0], "[system]");
        assert!(request.identities[1].ends_with("/reader-bot"));
    }

    #[test]
    fn bad_identity_sections_are_refused() {
        let refused = |text: &str| {
            ComputeFile::from_yaml(text)
                .and_then(ComputeFile::into_request)
                .unwrap_err()
                .to_string()
        };
        assert!(refused("identity: {type: user_assigned}\n").contains("needs the identities"));
        assert!(refused("identity: {type: managed}\n").contains("`managed`"));
        assert!(refused("identity: {typ: system_assigned}\n").contains("typ"));
        assert!(refused("sise: Standard_D2_v2\n").contains("sise"));
    }
}
