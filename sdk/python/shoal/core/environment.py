"""`Environment` (v1): what a run's processes run in."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .. import _assets, _files
from .workspace import Workspace


class _Docker:
    def __init__(self) -> None:
        self.base_image: str | None = None
        self.enabled = True


class _Python:
    def __init__(self) -> None:
        self.user_managed_dependencies = False
        self.conda_dependencies: dict[str, Any] | None = None


class Environment:
    """An image, a conda specification on an image, or a registered environment.

    With no image and no registration, a run's command runs on the node itself.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.version: str | None = None
        self.docker = _Docker()
        self.python = _Python()
        self.environment_variables: dict[str, str] = {}
        self._registered = False

    @staticmethod
    def from_docker_image(name: str, image: str, conda_specification: str | None = None) -> Environment:
        env = Environment(name)
        env.docker.base_image = image
        if conda_specification:
            env.python.conda_dependencies, _ = _files.read_document(conda_specification, "conda file")
        return env

    @staticmethod
    def from_conda_specification(name: str, file_path: str | os.PathLike[str]) -> Environment:
        env = Environment(name)
        env.python.conda_dependencies, _ = _files.read_document(Path(file_path), "conda file")
        return env

    @staticmethod
    def get(workspace: Workspace, name: str, version: str | None = None) -> Environment:
        """A registered environment, by name (its latest version unless given)."""
        found = _assets.find(workspace._connection, "environments", name, version)
        env = Environment(name)
        env.version = str(found.get("version") or "") or None
        env._registered = True
        return env

    def register(self, workspace: Workspace) -> Environment:
        """Registered under its name: jobs may name it ``azureml:NAME:VERSION``."""
        made = _assets.create_environment(workspace._connection, {"name": self.name, **self.definition()}, Path.cwd())
        self.version = str(made.get("version") or "") or None
        self._registered = True
        return self

    def definition(self) -> dict[str, Any]:
        spec: dict[str, Any] = {}
        if self.docker.base_image:
            spec["image"] = self.docker.base_image
        if self.python.conda_dependencies:
            spec["conda_file"] = self.python.conda_dependencies
        return spec

    def job_environment(self) -> str | dict[str, Any] | None:
        """How a job file names it: registered (``azureml:NAME:VERSION``), inline, or nothing (the node)."""
        if self._registered:
            return f"azureml:{self.name}" + (f":{self.version}" if self.version else "")
        return self.definition() or None
