"""Clusters with the v1 names: `ComputeTarget`, `AmlCompute`."""

from __future__ import annotations

import builtins
from dataclasses import dataclass, field
from typing import Any

from ... import _clusters, errors
from ..._util import drop_none
from ..compute_target import ComputeTargetException
from ..workspace import Workspace

__all__ = ["AmlCompute", "AmlComputeProvisioningConfiguration", "ComputeTarget", "ComputeTargetException"]


def _user_ids(identity_id: list[str] | str | None) -> list[str]:
    if identity_id is None:
        return []
    return [identity_id] if isinstance(identity_id, str) else list(identity_id)


@dataclass
class AmlComputeProvisioningConfiguration:
    """What `AmlCompute.provisioning_configuration` makes; `ComputeTarget.create` sends it."""

    vm_size: str = ""
    vm_priority: str = "dedicated"
    min_nodes: int = 0
    max_nodes: int | None = None
    idle_seconds_before_scaledown: int | None = None
    identity_type: str | None = None
    identity_id: list[str] = field(default_factory=list)
    description: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    remote_login_port_public_access: str | None = None

    def body(self, name: str) -> dict[str, Any]:
        body: dict[str, Any] = {
            "name": name,
            "vm_size": self.vm_size,
            "vm_priority": self.vm_priority,
            "min_nodes": self.min_nodes,
        }
        if self.max_nodes is not None:
            body["max_nodes"] = self.max_nodes
        if self.idle_seconds_before_scaledown is not None:
            body["idle_seconds_before_scaledown"] = self.idle_seconds_before_scaledown
        if self.description:
            body["description"] = self.description
        if self.tags:
            body["tags"] = dict(self.tags)
        if self.identity_type:
            body["identity"] = {
                "type": self.identity_type,
                "user_assigned_identities": list(self.identity_id),
            }
        elif self.identity_id:
            body["identities"] = list(self.identity_id)
        return body


class _Status:
    """`get_status()`: the cluster's state as the coordinator reports it."""

    def __init__(self, cluster: dict[str, Any]) -> None:
        self.allocation_state = str(cluster["allocation_state"]).capitalize()
        self.current_node_count = int(cluster["current_node_count"])
        self.target_node_count = int(cluster["target_node_count"])
        self.node_state_counts = dict(cluster.get("node_state_counts") or {})
        self.errors = list(cluster.get("errors") or [])
        self.provisioning_state = "Failed" if self.errors else "Succeeded"
        self.vm_size = str(cluster["vm_size"])
        self.vm_priority = str(cluster["vm_priority"])
        self.scale_settings = {
            "minNodeCount": cluster["min_nodes"],
            "maxNodeCount": cluster["max_nodes"],
            "nodeIdleTimeBeforeScaleDown": f"PT{cluster['idle_seconds_before_scaledown']}S",
        }
        self._raw = cluster

    def serialize(self) -> dict[str, Any]:
        return dict(self._raw)

    def __repr__(self) -> str:
        return f"<status {self.allocation_state}, {self.current_node_count}/{self.target_node_count} nodes>"


class ComputeTarget:
    """A cluster. ``ComputeTarget(workspace=ws, name=...)`` finds one (raises
    `ComputeTargetException` when there is none); ``ComputeTarget.create`` makes one."""

    def __new__(cls, workspace: Workspace | None = None, name: str | None = None) -> ComputeTarget:
        return super().__new__(AmlCompute if cls is ComputeTarget else cls)

    def __init__(self, workspace: Workspace | None = None, name: str | None = None) -> None:
        if workspace is None or name is None:
            raise ComputeTargetException("ComputeTarget needs workspace= and name=")
        self.workspace = workspace
        self.name = name
        self._cluster = self._call(_clusters.get, name)

    @classmethod
    def _of(cls, workspace: Workspace, cluster: dict[str, Any]) -> AmlCompute:
        made = object.__new__(AmlCompute)
        made.workspace = workspace
        made.name = str(cluster["name"])
        made._cluster = cluster
        return made

    def _call(self, operation: Any, *args: Any) -> Any:
        try:
            return operation(self.workspace._connection, *args)
        except errors.ShoalError as e:
            if isinstance(e, errors.ConnectionFailed):
                raise
            raise ComputeTargetException(e.message, e.code, e.status) from e

    @staticmethod
    def create(
        workspace: Workspace, name: str, provisioning_configuration: AmlComputeProvisioningConfiguration
    ) -> AmlCompute:
        """Make the cluster; it scales between min and max nodes from here on."""
        try:
            made = _clusters.create(workspace._connection, provisioning_configuration.body(name))
        except errors.ShoalError as e:
            if isinstance(e, errors.ConnectionFailed):
                raise
            raise ComputeTargetException(e.message, e.code, e.status) from e
        return ComputeTarget._of(workspace, made)

    @staticmethod
    def list(workspace: Workspace) -> list[AmlCompute]:
        return [ComputeTarget._of(workspace, c) for c in _clusters.list_clusters(workspace._connection)]

    @property
    def type(self) -> str:
        return "AmlCompute"

    @property
    def vm_size(self) -> str:
        return str(self._cluster["vm_size"])

    @property
    def vm_priority(self) -> str:
        return str(self._cluster["vm_priority"])

    @property
    def scale_settings(self) -> dict[str, Any]:
        return _Status(self._cluster).scale_settings

    @property
    def provisioning_state(self) -> str:
        return _Status(self._cluster).provisioning_state

    def refresh_state(self) -> None:
        self._cluster = self._call(_clusters.get, self.name)

    def get_status(self) -> _Status:
        self.refresh_state()
        return _Status(self._cluster)

    def wait_for_completion(
        self,
        show_output: bool = False,
        min_node_count: int | None = None,
        timeout_in_minutes: float = 25,
        is_delete_operation: bool = False,
    ) -> None:
        """Until the cluster is steady with its minimum nodes ready (or gone, for a delete)."""
        if is_delete_operation:
            return
        try:
            self._cluster = _clusters.wait_steady(
                self.workspace._connection, self.name, show_output, timeout_in_minutes * 60
            )
        except errors.NotFoundError as e:
            raise ComputeTargetException(e.message, e.code, e.status) from e
        if self._cluster.get("errors"):
            raise ComputeTargetException("; ".join(self._cluster["errors"]))

    def update(
        self,
        min_nodes: int | None = None,
        max_nodes: int | None = None,
        idle_seconds_before_scaledown: int | None = None,
    ) -> None:
        patch = drop_none(
            {
                "min_nodes": min_nodes,
                "max_nodes": max_nodes,
                "idle_seconds_before_scaledown": idle_seconds_before_scaledown,
            }
        )
        self._cluster = self._call(_clusters.update, self.name, patch)

    def add_identity(self, identity_type: str, identity_id: builtins.list[str] | str | None = None) -> None:
        """``identity_type``: ``SystemAssigned``, ``UserAssigned`` (with ``identity_id``) or both."""
        section = {"type": identity_type, "user_assigned_identities": _user_ids(identity_id)}
        self._call(_clusters.assign_identities, self.name, section)
        self.refresh_state()

    def remove_identity(self, identity_id: builtins.list[str] | str | None = None) -> None:
        """Take user-assigned identities away, or the system-assigned one (no ids, or ``[system]``)."""
        for identity in _user_ids(identity_id) or ["[system]"]:
            self._call(_clusters.remove_identity, self.name, identity)
        self.refresh_state()

    @property
    def identity(self) -> builtins.list[dict[str, Any]]:
        """The identities its jobs may get tokens for (``[system]`` and user-assigned)."""
        found: list[dict[str, Any]] = self._call(_clusters.identities, self.name)
        return found

    def list_nodes(self) -> builtins.list[dict[str, Any]]:
        """Its nodes, as the service lists them (``nodeId``, ``nodeState``, ``runId``), with Shoal's readings."""
        return [
            {
                "nodeId": n["id"],
                "nodeState": n["state"],
                "runId": (n.get("attempt_id") or "").split(".")[0] or None,
                "hostname": n["hostname"],
                "shoal": n,
            }
            for n in self._call(_clusters.nodes, self.name)
        ]

    def lock(self, kind: str = "cannot-delete") -> None:
        """Shoal's own (the service uses Azure resource locks): ``cannot-delete`` or ``read-only``."""
        self._cluster = self._call(_clusters.lock, self.name, kind)

    def unlock(self) -> None:
        self._cluster = self._call(_clusters.unlock, self.name)

    def delete(self) -> None:
        """Drain and remove the cluster (refused while it is locked)."""
        self._call(_clusters.delete, self.name)

    def serialize(self) -> dict[str, Any]:
        return dict(self._cluster)

    def __repr__(self) -> str:
        return f"AmlCompute(workspace={self.workspace!r}, name={self.name}, vm_size={self.vm_size})"


class AmlCompute(ComputeTarget):
    """A cluster of nodes of one size, autoscaling between ``min_nodes`` and ``max_nodes``."""

    @staticmethod
    def provisioning_configuration(
        vm_size: str = "",
        vm_priority: str = "dedicated",
        min_nodes: int = 0,
        max_nodes: int | None = None,
        idle_seconds_before_scaledown: int | None = None,
        admin_username: str | None = None,
        admin_user_password: str | None = None,
        admin_user_ssh_key: str | None = None,
        vnet_resourcegroup_name: str | None = None,
        vnet_name: str | None = None,
        subnet_name: str | None = None,
        tags: dict[str, str] | None = None,
        description: str | None = None,
        remote_login_port_public_access: str = "NotSpecified",
        identity_type: str | None = None,
        identity_id: list[str] | str | None = None,
        location: str | None = None,
        enable_node_public_ip: bool = True,
    ) -> AmlComputeProvisioningConfiguration:
        """The service's arguments; those about Azure networks and logins have no effect here."""
        return AmlComputeProvisioningConfiguration(
            vm_size=vm_size,
            vm_priority=vm_priority,
            min_nodes=min_nodes,
            max_nodes=max_nodes,
            idle_seconds_before_scaledown=idle_seconds_before_scaledown,
            identity_type=identity_type,
            identity_id=_user_ids(identity_id),
            description=description,
            tags=dict(tags or {}),
            remote_login_port_public_access=remote_login_port_public_access,
        )

    @staticmethod
    def supported_vmsizes(workspace: Workspace, location: str | None = None) -> list[dict[str, Any]]:
        """The sizes a cluster may have, as the service lists them (``name``, ``vCPUs``, ``gpus``, ``memoryGB``)."""
        return [
            {
                "name": s["name"],
                "vCPUs": s["cores"],
                "gpus": s["gpus"],
                "memoryGB": s["memory_gib"],
                "family": s["family"],
                "gpuModel": s["gpu_model"],
            }
            for s in _clusters.vm_sizes(workspace._connection)
        ]
