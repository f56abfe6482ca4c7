"""``MLClient`` and its operations (``compute``, ``jobs``, ``environments``, ``data``, ``components``)."""

from __future__ import annotations

import builtins
import json
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Generic, TextIO, TypeVar
from urllib.parse import quote

from .. import _assets, _clusters, _files, _jobs, errors
from .._http import Connection
from .._util import drop_none
from ._nodes import JobFile, Node
from .entities import AmlCompute, Data, Environment, IdentityConfiguration, Job, ManagedIdentityConfiguration

T = TypeVar("T")


class Poller(Generic[T]):
    """A long operation under way (the service's ``LROPoller``): ``result()`` waits for its value."""

    def __init__(self, operation: Callable[[], T]) -> None:
        self._value: T | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(operation,), daemon=True)
        self._thread.start()

    def _run(self, operation: Callable[[], T]) -> None:
        try:
            self._value = operation()
        except BaseException as e:  # re-raised by result()
            self._error = e

    def done(self) -> bool:
        return not self._thread.is_alive()

    def status(self) -> str:
        if not self.done():
            return "InProgress"
        return "Failed" if self._error else "Succeeded"

    def wait(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)
        if self._error is not None:
            raise self._error

    def result(self, timeout: float | None = None) -> T:
        self.wait(timeout)
        if not self.done():
            raise TimeoutError(f"the operation is still under way after {timeout} s")
        return self._value  # type: ignore[return-value]


def _job_file(job: Node | JobFile) -> tuple[dict[str, Any], Path]:
    if isinstance(job, JobFile):
        return json.loads(json.dumps(job.doc)), job.base
    base = Path.cwd()
    return job.to_job(base), base


class ComputeOperations:
    def __init__(self, conn: Connection) -> None:
        self._conn = conn

    def _get(self, name: str) -> AmlCompute:
        cluster = _clusters.get(self._conn, name)
        return AmlCompute._from_view(cluster, _clusters.identities(self._conn, name))

    def begin_create_or_update(self, compute: AmlCompute) -> Poller[AmlCompute]:
        """Make the cluster (or change its bounds if it exists); the poller's result once it is steady."""
        try:
            _clusters.create(self._conn, compute.body())
        except errors.ConflictError:
            patch = drop_none(
                {
                    "min_instances": compute.min_instances,
                    "max_instances": compute.max_instances,
                    "idle_time_before_scale_down": compute.idle_time_before_scale_down,
                    "description": compute.description,
                }
            )
            _clusters.update(self._conn, compute.name, patch)
            if compute.identity is not None:
                _clusters.assign_identities(self._conn, compute.name, compute.identity.to_dict())

        def settle() -> AmlCompute:
            _clusters.wait_steady(self._conn, compute.name)
            return self._get(compute.name)

        return Poller(settle)

    def get(self, name: str) -> AmlCompute:
        return self._get(name)

    def list(self) -> Iterator[AmlCompute]:
        for cluster in _clusters.list_clusters(self._conn):
            yield AmlCompute._from_view(cluster)

    def begin_delete(self, name: str) -> Poller[None]:
        """Drain and remove it; the poller is done once it is gone."""
        _clusters.delete(self._conn, name)

        def gone() -> None:
            import time

            while True:
                try:
                    _clusters.get(self._conn, name)
                except errors.NotFoundError:
                    return
                time.sleep(0.2)

        return Poller(gone)

    def list_sizes(self, location: str | None = None) -> builtins.list[dict[str, Any]]:
        return _clusters.vm_sizes(self._conn)

    def begin_update(self, compute: AmlCompute) -> Poller[AmlCompute]:
        return self.begin_create_or_update(compute)

    def list_nodes(self, name: str) -> builtins.list[dict[str, Any]]:
        """The cluster's nodes: state, what each runs, CPU, memory and GPU readings."""
        return _clusters.nodes(self._conn, name)

    def list_usage(self, location: str | None = None) -> builtins.list[dict[str, Any]]:
        """Core quotas and their use (``family NAME``, ``low-priority``, ``total``)."""
        return _clusters.quotas(self._conn)


class JobOperations:
    def __init__(self, conn: Connection) -> None:
        self._conn = conn

    def create_or_update(
        self, job: Node | JobFile, *, experiment_name: str | None = None, compute: str | None = None
    ) -> Job:
        """Submit a job (built in Python, or read with ``load_job``): its local paths uploaded."""
        doc, base = _job_file(job)
        if experiment_name:
            doc["experiment_name"] = experiment_name
        if compute:
            doc["compute"] = compute
        return Job(_jobs.submit(self._conn, doc, base), self._conn.endpoint)

    def get(self, name: str) -> Job:
        return Job(_jobs.get(self._conn, name), self._conn.endpoint)

    def list(self, parent_job_name: str | None = None) -> Iterator[Job]:
        for job in _jobs.list_jobs(self._conn, parent=parent_job_name):
            yield Job(job, self._conn.endpoint)

    def stream(self, name: str, out: TextIO | None = None) -> None:
        """Its log as it runs, until it ends; a job that did not complete raises `JobFailed`."""
        job = _jobs.stream(self._conn, name, out)
        if job["status"] != "completed":
            raise errors.JobFailed(
                f"job {name} ended {_jobs.SERVICE_STATUS.get(job['status'], job['status'])}: "
                f"{job.get('reason') or 'see its log'}"
            )

    def begin_cancel(self, name: str) -> Poller[None]:
        _jobs.cancel(self._conn, name)

        def ended() -> None:
            _jobs.wait(self._conn, name)

        return Poller(ended)

    def download(
        self,
        name: str,
        download_path: str | os.PathLike[str] = ".",
        output_name: str | None = None,
        all: bool = False,
    ) -> None:
        """``named-outputs/NAME/`` for a named output; ``artifacts/`` (./outputs and logs) by default."""
        _jobs.download(self._conn, name, Path(download_path), output_name, all)

    def explain(self, name: str) -> builtins.list[str]:
        """Shoal's own: why it waits, where it runs, or why it ended (``shoal job why``)."""
        return _jobs.explain(self._conn, name)

    def archive(self, name: str) -> None:
        self._conn.request("DELETE", f"/api/v1/jobs/{quote(name, safe='')}")


class EnvironmentOperations:
    def __init__(self, conn: Connection) -> None:
        self._conn = conn

    def create_or_update(self, environment: Environment) -> Environment:
        """Register it (an image is checked or built now; a build context is uploaded)."""
        base = Path.cwd()
        return _environment(_assets.create_environment(self._conn, environment.definition(base), base))

    def get(self, name: str, version: str | None = None, label: str | None = None) -> Environment:
        return _environment(_assets.find(self._conn, "environments", name, version))

    def list(self) -> Iterator[Environment]:
        for env in self._conn.json("GET", "/api/v1/environments"):
            yield _environment(env)


def _environment(view: dict[str, Any]) -> Environment:
    return Environment(
        name=view.get("name"),
        version=str(view["version"]) if view.get("version") is not None else None,
        image=view.get("image"),
        description=view.get("description") or None,
    )


class DataOperations:
    def __init__(self, conn: Connection) -> None:
        self._conn = conn

    def create_or_update(self, data: Data) -> Data:
        """Register it; a local path is uploaded and kept by the coordinator."""
        return _data(_assets.create_data(self._conn, data.body(), Path.cwd()))

    def get(self, name: str, version: str | None = None, label: str | None = None) -> Data:
        return _data(_assets.find(self._conn, "data", name, version))

    def list(self, name: str | None = None) -> Iterator[Data]:
        for data in self._conn.json("GET", "/api/v1/data"):
            if name is None or data.get("name") == name:
                yield _data(data)


def _data(view: dict[str, Any]) -> Data:
    return Data(
        name=view.get("name"),
        version=str(view["version"]) if view.get("version") is not None else None,
        path=view.get("uri"),
        type=str(view.get("kind") or "uri_folder"),
        description=view.get("description") or None,
        id=f"azureml:{view.get('name')}:{view.get('version')}",
        extra=view,
    )


class ComponentOperations:
    def __init__(self, conn: Connection) -> None:
        self._conn = conn

    def create_or_update(self, component: str | os.PathLike[str], version: str | None = None) -> dict[str, Any]:
        """Register a component file (its code folder uploaded); steps name it ``azureml:NAME:VERSION``."""
        doc, base = _files.read_document(component, "component file")
        code = doc.get("code")
        parts = [_files.spec_part(json.dumps(doc))]
        if isinstance(code, str) and ":" not in code:
            parts.append(_files.local_part(base, code, True, True, "code"))
        params = {"version": version} if version else None
        made: dict[str, Any] = self._conn.json("POST", "/api/v1/components", files=parts, params=params)
        return made

    def list(self) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = self._conn.json("GET", "/api/v1/components")
        return found


class MLClient:
    """The v2 client. ``MLClient(credential, subscription_id, resource_group_name,
    workspace_name)`` is accepted as the service has it (the names are kept); the
    coordinator is ``endpoint=``, else found as the CLI finds it."""

    def __init__(
        self,
        credential: object | None = None,
        subscription_id: str | None = None,
        resource_group_name: str | None = None,
        workspace_name: str | None = None,
        *,
        endpoint: str | None = None,
        token: str | None = None,
        ca_file: str | os.PathLike[str] | None = None,
    ) -> None:
        self.subscription_id = subscription_id
        self.resource_group_name = resource_group_name
        self.workspace_name = workspace_name or "shoal"
        self._connection = Connection(endpoint, token, ca_file)
        self.compute = ComputeOperations(self._connection)
        self.jobs = JobOperations(self._connection)
        self.environments = EnvironmentOperations(self._connection)
        self.data = DataOperations(self._connection)
        self.components = ComponentOperations(self._connection)

    @classmethod
    def from_config(
        cls, credential: object | None = None, path: str | os.PathLike[str] | None = None, file_name: str | None = None
    ) -> MLClient:
        """The coordinator a ``config.json`` names (as ``Workspace.from_config``)."""
        from ..core.workspace import Workspace

        ws = Workspace.from_config(path, _file_name=file_name)
        client = cls(credential, ws.subscription_id, ws.resource_group, ws.name)
        client._connection = ws._connection
        for ops in (client.compute, client.jobs, client.environments, client.data, client.components):
            ops._conn = ws._connection
        return client

    @property
    def endpoint(self) -> str:
        return self._connection.endpoint


def load_job(source: str | os.PathLike[str]) -> JobFile:
    """A job file (command, sweep, parallel or pipeline), its relative paths from its own folder."""
    doc, base = _files.read_document(source, "job file")
    return JobFile(doc, base, str(source))


def load_compute(source: str | os.PathLike[str]) -> AmlCompute:
    """An amlCompute file (``name``, ``size``, ``min_instances``, ``max_instances``, ``tier``, ``identity``)."""
    doc, _ = _files.read_document(source, "compute file")
    identity = doc.get("identity")
    configured = None
    if isinstance(identity, dict):
        users = [
            ManagedIdentityConfiguration(**u)
            if isinstance(u, dict)
            else ManagedIdentityConfiguration(resource_id=str(u))
            for u in identity.get("user_assigned_identities") or []
        ]
        configured = IdentityConfiguration(type=str(identity.get("type")), user_assigned_identities=users)
    if not doc.get("name"):
        raise errors.ValidationError(f"compute file {source} has no `name`")
    return AmlCompute(
        name=str(doc["name"]),
        size=doc.get("size"),
        min_instances=doc.get("min_instances"),
        max_instances=doc.get("max_instances"),
        idle_time_before_scale_down=doc.get("idle_time_before_scale_down"),
        tier=doc.get("tier"),
        identity=configured,
        description=doc.get("description"),
        tags=doc.get("tags"),
    )
