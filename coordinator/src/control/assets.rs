//! What jobs are made of, registered here: datastores (folders of the
//! coordinator's machine), data assets (named, versioned pointers at data),
//! environments (images, or the nodes' own software), and the defaults that
//! `shoal configure --defaults` sets (the default compute).

use super::*;
use crate::data::{BUILT_IN_DATASTORES, DataAsset, Datastore, next_version, validate_name};
use crate::model::Environment;

/// Which version: a given one, or the latest (newest not archived).
fn pick<'a, T>(
    versions: impl Iterator<Item = &'a T>,
    version: Option<&str>,
    version_of: impl Fn(&T) -> &str,
    usable: impl Fn(&T) -> bool,
    created_at: impl Fn(&T) -> Millis,
) -> Option<&'a T>
where
    T: 'a,
{
    let mut candidates: Vec<&T> = versions.collect();
    match version {
        Some(v) => candidates.into_iter().find(|t| version_of(t) == v),
        None => {
            candidates.retain(|t| usable(t));
            candidates.into_iter().max_by_key(|t| created_at(t))
        }
    }
}

impl Control {
    /// `workspaceblobstore` and `workspaceartifactstore`, in `root`, from the start.
    pub(super) fn built_in_datastores(&mut self, root: &std::path::Path, now: Millis) {
        for name in BUILT_IN_DATASTORES {
            if !self.datastores.contains_key(name) {
                let datastore = Datastore {
                    name: name.to_string(),
                    path: root.join(name).to_string_lossy().into_owned(),
                    description: "made by the coordinator".into(),
                    created_at: now,
                };
                self.new_datastores.push(datastore.clone());
                self.datastores.insert(name.to_string(), datastore);
            }
        }
    }

    pub(super) fn create_datastore(
        &mut self,
        mut datastore: Datastore,
        now: Millis,
    ) -> Result<Datastore> {
        validate_name("name", &datastore.name)?;
        if self.datastores.contains_key(&datastore.name) {
            return Err(Error::AlreadyExists(format!(
                "datastore `{}` exists; `shoal datastore show {}` shows it",
                datastore.name, datastore.name
            )));
        }
        if !datastore.path.starts_with('/') {
            return Err(Error::invalid(
                "path",
                format!("`{}` is not an absolute folder", datastore.path),
            ));
        }
        datastore.created_at = now;
        info!(datastore = %datastore.name, path = %datastore.path, "datastore created");
        self.new_datastores.push(datastore.clone());
        self.datastores
            .insert(datastore.name.clone(), datastore.clone());
        Ok(datastore)
    }

    pub(super) fn datastore(&self, name: &str) -> Result<Datastore> {
        self.datastores.get(name).cloned().ok_or_else(|| {
            Error::NotFound(format!(
                "no datastore `{name}`; `shoal datastore list` shows them, `shoal datastore create --name {name} --path DIR` makes one"
            ))
        })
    }

    pub(super) fn create_data_asset(
        &mut self,
        mut asset: DataAsset,
        now: Millis,
    ) -> Result<DataAsset> {
        validate_name("name", &asset.name)?;
        let versions = self
            .data_assets
            .values()
            .filter(|a| a.name == asset.name)
            .map(|a| a.version.as_str());
        if asset.version.is_empty() {
            asset.version = next_version(versions);
        } else {
            validate_name("version", &asset.version)?;
        }
        let key = (asset.name.clone(), asset.version.clone());
        if self.data_assets.contains_key(&key) {
            return Err(Error::AlreadyExists(format!(
                "data asset `{}` version {} exists; give another --version",
                asset.name, asset.version
            )));
        }
        asset.created_at = now;
        info!(data = %asset.name, version = %asset.version, uri = %asset.uri, "data asset created");
        self.new_data_assets.push(asset.clone());
        self.data_assets.insert(key, asset.clone());
        Ok(asset)
    }

    pub(super) fn data_asset(&self, name: &str, version: Option<&str>) -> Result<DataAsset> {
        pick(
            self.data_assets.values().filter(|a| a.name == name),
            version,
            |a| a.version.as_str(),
            |_| true,
            |a| a.created_at,
        )
        .cloned()
        .ok_or_else(|| {
            let which = version.map_or("any version".to_string(), |v| format!("version {v}"));
            Error::NotFound(format!(
                "no data asset `{name}` ({which}); register it with `shoal data create --name {name} --path PATH` (`shoal data list` shows them)"
            ))
        })
    }

    pub(super) fn list_data_assets(&self) -> Vec<DataAsset> {
        self.data_assets.values().cloned().collect()
    }

    pub(super) fn create_environment(
        &mut self,
        mut environment: Environment,
        now: Millis,
    ) -> Result<Environment> {
        validate_name("name", &environment.name)?;
        let versions = self
            .environments
            .values()
            .filter(|e| e.name == environment.name)
            .map(|e| e.version.as_str());
        if environment.version.is_empty() {
            environment.version = next_version(versions);
        } else {
            validate_name("version", &environment.version)?;
        }
        let key = (environment.name.clone(), environment.version.clone());
        if self.environments.contains_key(&key) {
            return Err(Error::AlreadyExists(format!(
                "environment `{}` version {} exists; give another version",
                environment.name, environment.version
            )));
        }
        environment.created_at = now;
        environment.archived = false;
        info!(environment = %environment.name, version = %environment.version, "environment created");
        self.new_environments.push(environment.clone());
        self.environments.insert(key, environment.clone());
        Ok(environment)
    }

    pub(super) fn environment(&self, name: &str, version: Option<&str>) -> Result<Environment> {
        pick(
            self.environments.values().filter(|e| e.name == name),
            version,
            |e| e.version.as_str(),
            |e| !e.archived,
            |e| e.created_at,
        )
        .cloned()
        .ok_or_else(|| {
            let which = version.map_or("latest".to_string(), |v| format!("version {v}"));
            Error::NotFound(format!(
                "environment `{name}` ({which}) is not registered here; register it with `shoal environment create --name {name} --image IMAGE` (or `-f env.yml`); `shoal environment list` shows them"
            ))
        })
    }

    pub(super) fn list_environments(&self) -> Vec<Environment> {
        self.environments.values().cloned().collect()
    }

    /// Archived: not the latest any more (a job naming its version still gets it).
    pub(super) fn archive_environment(
        &mut self,
        name: &str,
        version: Option<&str>,
    ) -> Result<Environment> {
        let found = self.environment(name, version)?;
        let key = (found.name.clone(), found.version.clone());
        let environment = self
            .environments
            .get_mut(&key)
            .ok_or_else(|| Error::Internal("environment vanished".into()))?;
        environment.archived = true;
        self.new_environments.push(environment.clone());
        Ok(environment.clone())
    }

    pub(super) fn create_component(
        &mut self,
        mut component: crate::model::Component,
        now: Millis,
    ) -> Result<crate::model::Component> {
        validate_name("name", &component.name)?;
        let versions = self
            .components
            .values()
            .filter(|c| c.name == component.name)
            .map(|c| c.version.as_str());
        if component.version.is_empty() {
            component.version = next_version(versions);
        } else {
            validate_name("version", &component.version)?;
        }
        let key = (component.name.clone(), component.version.clone());
        if self.components.contains_key(&key) {
            return Err(Error::AlreadyExists(format!(
                "component `{}` version {} exists; give another version (`--version`, or `version:` in its file)",
                component.name, component.version
            )));
        }
        component.created_at = now;
        info!(component = %component.name, version = %component.version, "component created");
        self.new_components.push(component.clone());
        self.components.insert(key, component.clone());
        Ok(component)
    }

    pub(super) fn component(
        &self,
        name: &str,
        version: Option<&str>,
    ) -> Result<crate::model::Component> {
        pick(
            self.components.values().filter(|c| c.name == name),
            version,
            |c| c.version.as_str(),
            |_| true,
            |c| c.created_at,
        )
        .cloned()
        .ok_or_else(|| {
            let which = version.map_or("latest".to_string(), |v| format!("version {v}"));
            Error::NotFound(format!(
                "component `{name}` ({which}) is not registered here; register it with `shoal component create -f component.yml` (`shoal component list` shows them)"
            ))
        })
    }

    /// Sets (Some) or clears (None) defaults; what they are now.
    pub(super) fn set_defaults(
        &mut self,
        changes: BTreeMap<String, Option<String>>,
    ) -> Result<BTreeMap<String, String>> {
        for (key, value) in changes {
            if key.trim().is_empty() {
                return Err(Error::invalid(
                    "defaults",
                    "a default needs a name: KEY=VALUE",
                ));
            }
            if key == "compute"
                && let Some(name) = &value
                && !self.clusters.contains_key(name)
            {
                return Err(Error::NotFound(format!(
                    "cluster `{name}` does not exist; `shoal cluster list` shows the clusters"
                )));
            }
            match value {
                Some(value) => self.defaults.insert(key, value),
                None => self.defaults.remove(&key),
            };
        }
        self.defaults_dirty = true;
        Ok(self.defaults.clone())
    }
}
