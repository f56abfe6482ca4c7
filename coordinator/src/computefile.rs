//! The managed service's compute (amlCompute) YAML, as far as it applies here.
//! Unknown keys are errors, so a typo never passes as a default.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::model::ClusterRequest;
use crate::{Error, Result};

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
    pub provider: Option<String>,
    #[serde(default)]
    pub internode_communication: Option<bool>,
}

impl ComputeFile {
    pub fn from_yaml(text: &str) -> Result<Self> {
        let file: ComputeFile = serde_saphyr::from_str(text)
            .map_err(|e| Error::invalid("compute file", e.to_string()))?;
        if let Some(kind) = file.kind.as_deref()
            && kind != "amlcompute"
        {
            return Err(Error::invalid(
                "type",
                format!("`{kind}` clusters are not supported; use `amlcompute`"),
            ));
        }
        Ok(file)
    }

    /// The cluster it asks for (flags given beside the file are laid over it).
    pub fn into_request(self) -> ClusterRequest {
        ClusterRequest {
            name: self.name.unwrap_or_default(),
            vm_size: self.size.unwrap_or_default(),
            vm_priority: self.tier.unwrap_or_default(),
            min_nodes: self.min_instances,
            max_nodes: self.max_instances,
            idle_seconds_before_scaledown: self.idle_time_before_scale_down,
            description: self.description.unwrap_or_default(),
            tags: self.tags,
            provider: self.provider.unwrap_or_default(),
            internode_communication: self.internode_communication,
            ..Default::default()
        }
    }
}
