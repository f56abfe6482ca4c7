"""`ScriptRunConfig`, `Experiment` and `Run` (v1): a script run as a job."""

from __future__ import annotations

import shlex
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, TextIO

from .. import _jobs, errors
from .compute import ComputeTarget
from .environment import Environment
from .runconfig import DistributedConfig
from .workspace import Workspace


class ScriptRunConfig:
    """A script (or a command) in a source directory, on a compute target."""

    def __init__(
        self,
        source_directory: str = ".",
        script: str | None = None,
        arguments: list[Any] | None = None,
        run_config: object | None = None,
        _telemetry_values: object | None = None,
        compute_target: ComputeTarget | str | None = None,
        environment: Environment | None = None,
        distributed_job_config: DistributedConfig | None = None,
        resume_from: object | None = None,
        max_run_duration_seconds: int | None = None,
        command: list[Any] | str | None = None,
        docker_runtime_config: object | None = None,
        node_count: int | None = None,
    ) -> None:
        if script is None and command is None:
            raise errors.ValidationError("ScriptRunConfig needs script= or command=")
        if script is not None and command is not None:
            raise errors.ValidationError("ScriptRunConfig takes script= or command=, not both")
        self.source_directory = source_directory
        self.script = script
        self.arguments = list(arguments or [])
        self.command = command
        self.compute_target = compute_target
        self.environment = environment
        self.distributed_job_config = distributed_job_config
        self.max_run_duration_seconds = max_run_duration_seconds
        self.node_count = node_count

    def job_file(self, experiment_name: str) -> dict[str, Any]:
        """The commandJob the coordinator admits for it."""
        if self.command is not None:
            line = self.command if isinstance(self.command, str) else shlex.join(map(str, self.command))
        else:
            line = shlex.join(["python", str(self.script), *map(str, self.arguments)])
        doc: dict[str, Any] = {
            "type": "command",
            "command": line,
            "code": str(Path(self.source_directory).resolve()),
            "experiment_name": experiment_name,
        }
        target = self.compute_target
        if isinstance(target, ComputeTarget):
            doc["compute"] = target.name
        elif target and target != "local":
            doc["compute"] = str(target)
        if self.environment is not None:
            env = self.environment.job_environment()
            if env is not None:
                doc["environment"] = env
            if self.environment.environment_variables:
                doc["environment_variables"] = dict(self.environment.environment_variables)
        nodes = self.node_count
        config = self.distributed_job_config
        if config is not None:
            doc["distribution"] = config.distribution()
            nodes = nodes or config.node_count
        if nodes:
            doc["resources"] = {"instance_count": nodes}
        if self.max_run_duration_seconds:
            doc["limits"] = {"timeout": self.max_run_duration_seconds}
        return doc


class Run:
    """A submitted job, with the v1 names."""

    def __init__(self, experiment: Experiment, run_id: str, job: dict[str, Any] | None = None) -> None:
        self.experiment = experiment
        self.id = run_id
        self._job = job or _jobs.get(experiment.workspace._connection, run_id)

    @property
    def _connection(self) -> Any:
        return self.experiment.workspace._connection

    @property
    def display_name(self) -> str:
        return str(self._job.get("name") or self.id)

    @property
    def status(self) -> str:
        status = str(self._job["status"])
        return _jobs.SERVICE_STATUS.get(status, status)

    def get_status(self) -> str:
        """``Queued``, ``Preparing``, ``Running``, ``Completed``, ``Failed``, ``Canceled``."""
        self._job = _jobs.get(self._connection, self.id)
        return self.status

    def get_details(self) -> dict[str, Any]:
        """The job as the service details a run: ids, status, times, target, and Shoal's own record."""
        self._job = _jobs.get(self._connection, self.id)
        job = self._job
        return {
            "runId": self.id,
            "target": job.get("cluster"),
            "status": self.status,
            "startTimeUtc": job.get("started_at"),
            "endTimeUtc": job.get("ended_at"),
            "properties": {"instance_count": job.get("instance_count")},
            "warnings": job.get("warnings") or [],
            "error": {"message": job.get("reason")} if job["status"] in ("failed", "timed_out") else None,
            "shoal": job,
        }

    def wait_for_completion(
        self,
        show_output: bool = False,
        wait_post_processing: bool = False,
        raise_on_error: bool = True,
        out: TextIO | None = None,
    ) -> dict[str, Any]:
        """Until it ends, its log streamed with ``show_output``; a failure raises with ``raise_on_error``."""
        conn = self._connection
        self._job = _jobs.stream(conn, self.id, out or sys.stdout) if show_output else _jobs.wait(conn, self.id)
        if raise_on_error and self._job["status"] != "completed":
            raise errors.JobFailed(f"run {self.id} ended {self.status}: {self._job.get('reason') or 'see its log'}")
        return self.get_details()

    def get_metrics(self, name: str | None = None) -> dict[str, Any]:
        """What the run logged with MLflow: each metric's value (a list where logged several times)."""
        found = _jobs.latest_metrics(self._connection, self.id)
        return {name: found[name]} if name is not None and name in found else ({} if name else found)

    def download_files(
        self,
        prefix: str | None = None,
        output_directory: str | None = None,
        output_paths: list[str] | None = None,
        batch_size: int = 100,
        append_prefix: bool = True,
    ) -> list[str]:
        """What the run wrote to ./outputs (``outputs/``, every instance laid over the
        others) and its log (``user_logs/std_log.txt``), under ``output_directory``."""
        root = Path(output_directory or ".")
        with tempfile.TemporaryDirectory() as scratch:
            _jobs.download(self._connection, self.id, scratch)
            artifacts = Path(scratch) / "artifacts"
            for instance in sorted((artifacts / "outputs").glob("instance-*")):
                shutil.copytree(instance, root / "outputs", dirs_exist_ok=True)
            shutil.copytree(artifacts / "user_logs", root / "user_logs", dirs_exist_ok=True)
        files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
        return [f for f in files if prefix is None or f.startswith(prefix)]

    def get_file_names(self) -> list[str]:
        with tempfile.TemporaryDirectory() as scratch:
            return self.download_files(output_directory=scratch)

    def cancel(self) -> None:
        self._job = _jobs.cancel(self._connection, self.id)

    def explain(self) -> list[str]:
        """Shoal's own: why it waits, where it runs, or why it ended (``shoal job why``)."""
        return _jobs.explain(self._connection, self.id)

    def get_children(self) -> list[Run]:
        """A sweep's trials, a pipeline's steps."""
        return [Run(self.experiment, str(j["id"]), j) for j in _jobs.list_jobs(self._connection, parent=self.id)]

    def __repr__(self) -> str:
        return f"Run(Experiment: {self.experiment.name}, Id: {self.id}, Status: {self.status})"


class Experiment:
    """A name runs are grouped (and their metrics tracked) under."""

    def __init__(self, workspace: Workspace, name: str) -> None:
        self.workspace = workspace
        self.name = name

    def submit(self, config: ScriptRunConfig, tags: dict[str, str] | None = None) -> Run:
        """The run admitted and queued: its code uploaded, its cluster scaled up as needed."""
        doc = config.job_file(self.name)
        if tags:
            doc["tags"] = dict(tags)
        job = _jobs.submit(self.workspace._connection, doc, Path.cwd())
        return Run(self, str(job["id"]), job)

    def __repr__(self) -> str:
        return f"Experiment(Name: {self.name}, Workspace: {self.workspace.name})"
