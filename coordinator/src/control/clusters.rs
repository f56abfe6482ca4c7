//! Clusters: create, update, delete, and the nodes they are given (by the
//! provider, or joined by hand).

use super::*;

impl Control {
    pub(super) fn cluster_info(&self, name: &str) -> Result<ClusterInfo> {
        let mut cluster = self.cluster(name)?.clone();
        // What blocks its growth now, first among its errors (kept as a value,
        // not written with them).
        if let Some(block) = self.blocked.get(name) {
            cluster
                .errors
                .insert(0, ClusterError::Blocked(block.clone()));
        }
        let mut counts = NodeCounts::default();
        for node in self.nodes.values().filter(|n| n.cluster == name) {
            let counter = match node.state {
                NodeState::Idle => &mut counts.idle,
                NodeState::Running => &mut counts.running,
                NodeState::Preparing => &mut counts.preparing,
                NodeState::Leaving => &mut counts.leaving,
                NodeState::Preempted => &mut counts.preempted,
                NodeState::Unusable => &mut counts.unusable,
            };
            *counter += 1;
        }
        let current = counts.idle + counts.running + counts.preparing + counts.leaving;
        let target = self
            .targets
            .get(name)
            .copied()
            .unwrap_or(cluster.spec.min_nodes);
        // Idle nodes waiting out their idle timeout are not a resize in progress.
        let active = counts.idle + counts.running + counts.preparing;
        Ok(ClusterInfo {
            resizing: active < target || counts.preparing > 0 || counts.leaving > 0,
            identities: self.assigned(&cluster),
            cluster,
            counts,
            current_node_count: current,
            target_node_count: target,
        })
    }

    pub(super) fn create_cluster(
        &mut self,
        mut request: ClusterRequest,
        now: Millis,
    ) -> Result<ClusterInfo> {
        let wanted = std::mem::take(&mut request.identities);
        let spec = ClusterSpec::from_request(request, &self.config.catalog)?;
        if self.clusters.contains_key(&spec.name) {
            return Err(Error::AlreadyExists(format!(
                "cluster `{}` already exists; pick another name or `shoal cluster update` it",
                spec.name
            )));
        }
        // An unknown identity refuses the whole create: nothing is made.
        let identities = self.with_identities(&[], &wanted)?;
        let name = spec.name.clone();
        info!(cluster = %name, size = %spec.vm_size, min = spec.min_nodes, max = spec.max_nodes, "cluster created");
        self.clusters.insert(
            name.clone(),
            Cluster {
                spec,
                created_at: now,
                errors: Vec::new(),
                lock: None,
                identities,
            },
        );
        self.dirty_clusters.insert(name.clone());
        self.cluster_info(&name)
    }

    pub(super) fn update_cluster(&mut self, update: ClusterUpdate) -> Result<ClusterInfo> {
        let cluster = self.cluster(&update.name)?;
        if cluster.lock == Some(LockKind::ReadOnly) {
            return Err(Error::FailedPrecondition(format!(
                "cluster `{}` is locked read-only; `shoal cluster unlock {}` first",
                update.name, update.name
            )));
        }
        let next = cluster.spec.apply(&update)?;
        if let Some(cluster) = self.clusters.get_mut(&update.name) {
            cluster.spec = next;
        }
        self.dirty_clusters.insert(update.name.clone());
        self.cluster_info(&update.name)
    }

    pub(super) fn delete_cluster(&mut self, name: &str) -> Result<ClusterInfo> {
        let info = self.cluster_info(name)?;
        if let Some(lock) = info.cluster.lock {
            return Err(Error::FailedPrecondition(format!(
                "cluster `{name}` is locked {}; `shoal cluster unlock {name}` first",
                lock.as_str()
            )));
        }
        let active = self
            .jobs
            .values()
            .filter(|j| j.spec.cluster == name && !j.status.is_final())
            .count();
        if active > 0 {
            return Err(Error::FailedPrecondition(format!(
                "cluster `{name}` has {active} job(s) queued or running; cancel them first (`shoal job list --cluster {name}`)"
            )));
        }
        let node_ids: Vec<String> = self
            .nodes
            .values()
            .filter(|n| n.cluster == name && n.state != NodeState::Leaving)
            .map(|n| n.id.clone())
            .collect();
        for id in node_ids {
            self.remove_node(&id, "cluster deleted");
        }
        self.clusters.remove(name);
        self.targets.remove(name);
        self.deleted_clusters.insert(name.to_string());
        info!(cluster = %name, "cluster deleted");
        Ok(info)
    }

    /// A node of an agent started by hand (its machine's own cores and memory).
    pub(super) fn join_node(
        &mut self,
        cluster: &str,
        hostname: &str,
        cores: u32,
        memory_bytes: u64,
        now: Millis,
    ) -> Result<Node> {
        if !self.clusters.contains_key(cluster) {
            return Err(Error::NotFound(format!(
                "cluster `{cluster}` does not exist"
            )));
        }
        let id = format!("{cluster}-j{}", self.next_node_seq);
        self.next_node_seq += 1;
        self.seqs_dirty = true;
        let mut node = Node::preparing(
            &id,
            cluster,
            cores.max(1),
            memory_bytes,
            ProviderKind::Joined,
            now,
        );
        node.hostname = hostname.to_string();
        info!(node = %id, cluster, hostname, "node joined");
        self.nodes.insert(id.clone(), node.clone());
        self.dirty_nodes.insert(id);
        Ok(node)
    }

    /// The agent of a node a provider is bringing up (slurm, command) presents the
    /// join token made for it: the node must still be waiting for it.
    pub(super) fn provided_node_joins(
        &mut self,
        cluster: &str,
        node_id: &str,
        hostname: &str,
    ) -> Result<Node> {
        let node = self
            .nodes
            .get_mut(node_id)
            .filter(|n| n.cluster == cluster)
            .ok_or_else(|| Error::NotFound(format!("node `{node_id}` is gone")))?;
        if node.state != NodeState::Preparing {
            return Err(Error::FailedPrecondition(format!(
                "node `{node_id}` is {}, not waiting for its agent",
                node.state.as_str()
            )));
        }
        node.hostname = hostname.to_string();
        node.message.clear();
        info!(node = %node_id, cluster, hostname, "provided node's agent joined");
        let node = node.clone();
        self.dirty_nodes.insert(node_id.to_string());
        Ok(node)
    }

    pub(super) fn create_node(&mut self, cluster: &str, now: Millis) {
        let provider = self
            .clusters
            .get(cluster)
            .map(|c| c.spec.provider)
            .unwrap_or_default();
        let size = self
            .clusters
            .get(cluster)
            .and_then(|c| self.config.catalog.get(&c.spec.vm_size).cloned());
        let Some(size) = size else {
            error!(cluster, "cluster has a vm size the catalog no longer knows");
            return;
        };
        let id = format!("{cluster}-n{}", self.next_node_seq);
        self.next_node_seq += 1;
        self.seqs_dirty = true;
        let node = Node::preparing(&id, cluster, size.cores, size.memory_bytes(), provider, now);
        info!(node = %id, cluster, "creating node");
        let settings = self
            .clusters
            .get(cluster)
            .map(|c| c.spec.provider_settings.clone())
            .unwrap_or_default();
        self.to_create.push(NodeLaunch {
            provider,
            node_id: id.clone(),
            cluster: cluster.to_string(),
            cores: node.cores,
            memory_bytes: node.memory_bytes,
            gpus: size.gpus,
            vm_size: size.name.clone(),
            settings: settings.clone(),
            notes: Default::default(),
        });
        let mut node = node;
        node.settings = settings;
        self.nodes.insert(id.clone(), node);
        self.dirty_nodes.insert(id);
    }
}
