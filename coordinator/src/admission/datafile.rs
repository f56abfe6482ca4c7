//! The managed service's data asset YAML (`$schema, name, version, type, path,
//! description, tags`): read the same way for `shoal data create -f` and
//! `POST /api/v1/data`.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::jobfile::Scalar;
use crate::{Error, Result};

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataFile {
    #[serde(rename = "$schema", default)]
    pub schema: Option<String>,
    pub name: String,
    #[serde(default)]
    pub version: Option<Scalar>,
    #[serde(rename = "type", default)]
    pub kind: Option<String>,
    pub path: String,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub tags: BTreeMap<String, Scalar>,
}

impl DataFile {
    /// YAML, or JSON (which is YAML too).
    pub fn from_yaml(text: &str) -> Result<Self> {
        serde_saphyr::from_str(text).map_err(|e| Error::invalid("data file", e.to_string()))
    }

    /// The request it makes; a local `path` goes with its content in `upload`.
    pub fn into_request(
        self,
        upload: Option<shoal_proto::v1::LocalFile>,
    ) -> shoal_proto::v1::DataAssetRequest {
        shoal_proto::v1::DataAssetRequest {
            name: self.name,
            version: self.version.map(|v| v.to_string()).unwrap_or_default(),
            r#type: self.kind.unwrap_or_default(),
            path: self.path,
            description: self.description.unwrap_or_default(),
            tags: self
                .tags
                .into_iter()
                .map(|(k, v)| (k, v.to_string()))
                .collect(),
            upload,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_data_schema_is_read_and_typos_are_refused() {
        let file = DataFile::from_yaml(
            "$schema: https://azuremlschemas.azureedge.net/latest/data.schema.json\n\
             name: iris\nversion: 1\ntype: uri_file\npath: ./iris.csv\ntags: {source: uci}\n",
        )
        .expect("accepted");
        let request = file.into_request(None);
        assert_eq!(request.version, "1");
        assert_eq!(request.tags["source"], "uci");
        let err = DataFile::from_yaml("name: x\npath: a\ntyp: uri_file\n").unwrap_err();
        assert!(err.to_string().contains("typ"), "{err}");
        assert!(
            DataFile::from_yaml("path: a\n").is_err(),
            "a name is needed"
        );
    }
}
