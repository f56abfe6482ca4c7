//! The catalog of VM sizes a cluster can be made of: well-known Azure sizes (every
//! one the managed-service document names) plus the sizes a coordinator config adds.
//! Names are case-insensitive; lookups of unknown names suggest close ones.

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmSize {
    pub name: String,
    pub cores: u32,
    pub memory_gib: f64,
    #[serde(default)]
    pub gpus: u32,
    #[serde(default)]
    pub gpu_model: String,
    pub family: String,
}

impl VmSize {
    pub fn memory_bytes(&self) -> u64 {
        (self.memory_gib * 1024.0 * 1024.0 * 1024.0) as u64
    }
}

/// (name, cores, memory GiB, gpus, gpu model, quota family)
const BUILT_IN: &[(&str, u32, f64, u32, &str, &str)] = &[
    ("Standard_D1_v2", 1, 3.5, 0, "", "standardDv2Family"),
    ("Standard_D2_v2", 2, 7.0, 0, "", "standardDv2Family"),
    ("Standard_D3_v2", 4, 14.0, 0, "", "standardDv2Family"),
    ("Standard_D4_v2", 8, 28.0, 0, "", "standardDv2Family"),
    ("Standard_D11_v2", 2, 14.0, 0, "", "standardDv2Family"),
    ("Standard_D12_v2", 4, 28.0, 0, "", "standardDv2Family"),
    ("Standard_DS3_v2", 4, 14.0, 0, "", "standardDSv2Family"),
    ("Standard_DS12_v2", 4, 28.0, 0, "", "standardDSv2Family"),
    ("Standard_D2s_v3", 2, 8.0, 0, "", "standardDSv3Family"),
    ("Standard_D4s_v3", 4, 16.0, 0, "", "standardDSv3Family"),
    ("Standard_D8s_v3", 8, 32.0, 0, "", "standardDSv3Family"),
    ("Standard_F4s_v2", 4, 8.0, 0, "", "standardFSv2Family"),
    ("Standard_E4s_v3", 4, 32.0, 0, "", "standardESv3Family"),
    ("Standard_NC6", 6, 56.0, 1, "Tesla K80", "standardNCFamily"),
    (
        "Standard_NC12",
        12,
        112.0,
        2,
        "Tesla K80",
        "standardNCFamily",
    ),
    (
        "Standard_NC24",
        24,
        224.0,
        4,
        "Tesla K80",
        "standardNCFamily",
    ),
    (
        "Standard_NC6s_v3",
        6,
        112.0,
        1,
        "Tesla V100",
        "standardNCSv3Family",
    ),
    (
        "Standard_NC12s_v3",
        12,
        224.0,
        2,
        "Tesla V100",
        "standardNCSv3Family",
    ),
    (
        "Standard_NC24s_v3",
        24,
        448.0,
        4,
        "Tesla V100",
        "standardNCSv3Family",
    ),
    (
        "Standard_NC4as_T4_v3",
        4,
        28.0,
        1,
        "Tesla T4",
        "standardNCASv3_T4Family",
    ),
    (
        "Standard_NC24ads_A100_v4",
        24,
        220.0,
        1,
        "A100 80GB",
        "standardNCADSA100v4Family",
    ),
    (
        "Standard_ND40rs_v2",
        40,
        672.0,
        8,
        "Tesla V100",
        "standardNDSv2Family",
    ),
    (
        "Standard_ND96asr_v4",
        96,
        900.0,
        8,
        "A100 40GB",
        "standardNDASv4_A100Family",
    ),
    (
        "Standard_ND96isr_H100_v5",
        96,
        1900.0,
        8,
        "H100 80GB",
        "standardNDSH100v5Family",
    ),
];

#[derive(Clone, Debug)]
pub struct Catalog {
    sizes: Vec<VmSize>,
}

impl Default for Catalog {
    fn default() -> Self {
        let sizes = BUILT_IN
            .iter()
            .map(
                |&(name, cores, memory_gib, gpus, gpu_model, family)| VmSize {
                    name: name.to_string(),
                    cores,
                    memory_gib,
                    gpus,
                    gpu_model: gpu_model.to_string(),
                    family: family.to_string(),
                },
            )
            .collect();
        Catalog { sizes }
    }
}

impl Catalog {
    /// The built-in sizes plus `extra`; an extra size with a built-in name replaces it.
    pub fn with_extra(extra: &[VmSize]) -> Self {
        let mut catalog = Catalog::default();
        for size in extra {
            catalog
                .sizes
                .retain(|s| !s.name.eq_ignore_ascii_case(&size.name));
            catalog.sizes.push(size.clone());
        }
        catalog
    }

    pub fn all(&self) -> &[VmSize] {
        &self.sizes
    }

    pub fn get(&self, name: &str) -> Option<&VmSize> {
        self.sizes
            .iter()
            .find(|s| s.name.eq_ignore_ascii_case(name))
    }

    /// Looks `name` up, or explains what exists that looks like it.
    pub fn resolve(&self, name: &str) -> crate::Result<&VmSize> {
        if let Some(size) = self.get(name) {
            return Ok(size);
        }
        let wanted = name.to_ascii_lowercase();
        let mut close: Vec<(f64, &str)> = self
            .sizes
            .iter()
            .map(|s| {
                let score = strsim::jaro_winkler(&wanted, &s.name.to_ascii_lowercase());
                (score, s.name.as_str())
            })
            .filter(|(score, _)| *score > 0.8)
            .collect();
        close.sort_by(|a, b| b.0.total_cmp(&a.0));
        let hint = if close.is_empty() {
            "; `shoal vm-size list` shows the sizes".to_string()
        } else {
            let names: Vec<&str> = close.iter().take(3).map(|(_, n)| *n).collect();
            format!("; did you mean {}?", names.join(", "))
        };
        Err(crate::Error::invalid(
            "vm_size",
            format!("unknown vm size `{name}`{hint}"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_case_insensitive() {
        let catalog = Catalog::default();
        let upper = catalog.get("STANDARD_D3_V2").map(|s| s.cores);
        assert_eq!(upper, Some(4));
        assert_eq!(catalog.get("standard_nc6").map(|s| s.gpus), Some(1));
    }

    #[test]
    fn unknown_size_suggests_close_names() {
        let err = Catalog::default().resolve("Standard_D3_v9").unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("did you mean") && text.contains("Standard_D3_v2"),
            "{text}"
        );
    }

    #[test]
    fn config_sizes_extend_the_catalog() {
        let extra = VmSize {
            name: "local-small".into(),
            cores: 1,
            memory_gib: 1.0,
            gpus: 0,
            gpu_model: String::new(),
            family: "local".into(),
        };
        let catalog = Catalog::with_extra(&[extra]);
        assert!(catalog.get("LOCAL-SMALL").is_some());
        assert!(catalog.get("Standard_D2_v2").is_some());
    }
}
