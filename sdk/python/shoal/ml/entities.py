"""The v2 entities (``azure.ai.ml.entities``): what a job file, compute file or asset file holds."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import _files
from .._util import drop_none as _drop_none


@dataclass
class ManagedIdentityConfiguration:
    """A user-assigned identity: its ``resource_id`` (its name is the last segment), or ``client_id``."""

    client_id: str | None = None
    resource_id: str | None = None
    object_id: str | None = None
    principal_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return _drop_none({"resource_id": self.resource_id, "client_id": self.client_id})


@dataclass
class IdentityConfiguration:
    """``type``: ``system_assigned``, ``user_assigned`` or ``system_assigned,user_assigned``."""

    type: str
    user_assigned_identities: list[ManagedIdentityConfiguration] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "user_assigned_identities": [i.to_dict() for i in self.user_assigned_identities or []],
        }


@dataclass
class AmlCompute:
    """A cluster (the amlCompute schema): ``size``, ``min_instances``, ``max_instances``,
    ``idle_time_before_scale_down`` (seconds), ``tier`` (``dedicated`` or ``low_priority``)."""

    name: str
    size: str | None = None
    min_instances: int | None = None
    max_instances: int | None = None
    idle_time_before_scale_down: int | None = None
    tier: str | None = None
    identity: IdentityConfiguration | None = None
    description: str | None = None
    tags: dict[str, str] | None = None
    location: str | None = None
    type: str = "amlcompute"
    # What the coordinator reports once it exists.
    provisioning_state: str | None = None
    current_node_count: int | None = None
    target_node_count: int | None = None
    allocation_state: str | None = None
    node_state_counts: dict[str, int] | None = None
    errors: list[str] | None = None
    identities: list[dict[str, Any]] | None = None

    def body(self) -> dict[str, Any]:
        return _drop_none(
            {
                "name": self.name,
                "size": self.size or "",
                "tier": self.tier,
                "min_instances": self.min_instances,
                "max_instances": self.max_instances,
                "idle_time_before_scale_down": self.idle_time_before_scale_down,
                "description": self.description,
                "tags": self.tags,
                "identity": self.identity.to_dict() if self.identity else None,
            }
        )

    @staticmethod
    def _from_view(cluster: dict[str, Any], identities: list[dict[str, Any]] | None = None) -> AmlCompute:
        return AmlCompute(
            name=str(cluster["name"]),
            size=str(cluster["vm_size"]),
            min_instances=int(cluster["min_nodes"]),
            max_instances=int(cluster["max_nodes"]),
            idle_time_before_scale_down=int(cluster["idle_seconds_before_scaledown"]),
            tier="low_priority" if cluster["vm_priority"] == "lowpriority" else "dedicated",
            description=str(cluster.get("description") or "") or None,
            tags=dict(cluster.get("tags") or {}),
            provisioning_state="Failed" if cluster.get("errors") else "Succeeded",
            current_node_count=int(cluster["current_node_count"]),
            target_node_count=int(cluster["target_node_count"]),
            allocation_state=str(cluster["allocation_state"]).capitalize(),
            node_state_counts=dict(cluster.get("node_state_counts") or {}),
            errors=list(cluster.get("errors") or []),
            identities=identities,
        )


@dataclass
class BuildContext:
    """An image built from a folder with a Dockerfile."""

    path: str
    dockerfile_path: str | None = None


@dataclass
class Environment:
    """An image, a conda file on an image, or a build context; registered with a name and version."""

    name: str | None = None
    version: str | None = None
    image: str | None = None
    conda_file: str | dict[str, Any] | None = None
    build: BuildContext | None = None
    description: str | None = None
    tags: dict[str, str] | None = None

    def definition(self, base: Path) -> dict[str, Any]:
        """As an environment file holds it; a conda file read, a build context made absolute."""
        conda = self.conda_file
        if isinstance(conda, (str, os.PathLike)):
            conda, _ = _files.read_document(base / conda, "conda file")
        build = None
        if self.build is not None:
            build = _drop_none(
                {
                    "path": str((base / self.build.path).resolve()),
                    "dockerfile_path": self.build.dockerfile_path,
                }
            )
        return _drop_none(
            {
                "name": self.name,
                "version": self.version,
                "image": self.image,
                "conda_file": conda,
                "build": build,
                "description": self.description,
                "tags": self.tags,
            }
        )


@dataclass
class Data:
    """A data asset: a ``path`` (local, ``azureml://datastores/...``, or a URL) under a name and version."""

    name: str | None = None
    version: str | None = None
    path: str | None = None
    type: str = "uri_folder"
    description: str | None = None
    tags: dict[str, str] | None = None
    # What the coordinator reports once registered.
    id: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def body(self) -> dict[str, Any]:
        return _drop_none(
            {
                "name": self.name,
                "version": self.version,
                "path": self.path,
                "type": self.type,
                "description": self.description,
                "tags": self.tags,
            }
        )


@dataclass
class MpiDistribution:
    process_count_per_instance: int = 1

    def to_dict(self) -> dict[str, Any]:
        return {"type": "mpi", "process_count_per_instance": self.process_count_per_instance}


@dataclass
class PyTorchDistribution:
    process_count_per_instance: int = 1

    def to_dict(self) -> dict[str, Any]:
        return {"type": "pytorch", "process_count_per_instance": self.process_count_per_instance}


@dataclass
class TensorFlowDistribution:
    worker_count: int = 1
    parameter_server_count: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": "tensorflow",
            "worker_count": self.worker_count,
            "parameter_server_count": self.parameter_server_count,
        }


@dataclass
class JobResourceConfiguration:
    instance_count: int | None = None
    instance_type: str | None = None
    shm_size: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return _drop_none(
            {"instance_count": self.instance_count, "instance_type": self.instance_type, "shm_size": self.shm_size}
        )


Distribution = MpiDistribution | PyTorchDistribution | TensorFlowDistribution


class Job:
    """A submitted job as the coordinator shows it: ``name`` is its id (``job-N``)."""

    def __init__(self, view: dict[str, Any], endpoint: str = "") -> None:
        from .._jobs import SERVICE_STATUS

        self._view = view
        self.name: str = str(view["id"])
        self.id = self.name
        self.display_name: str = str(view.get("name") or self.name)
        self.status: str = SERVICE_STATUS.get(str(view["status"]), str(view["status"]))
        self.compute: str = str(view.get("cluster") or "")
        self.outputs: list[str] = list(view.get("outputs") or [])
        self.studio_url = f"{endpoint}/api/v1/jobs/{self.name}" if endpoint else ""
        self.type = "pipeline" if view.get("pipeline") else "sweep" if view.get("sweep") else "command"

    @property
    def raw(self) -> dict[str, Any]:
        """Everything the coordinator says of it (instances, attempts, steps, trials, ...)."""
        return self._view

    def __repr__(self) -> str:
        return f"Job(name={self.name!r}, type={self.type!r}, status={self.status!r})"
