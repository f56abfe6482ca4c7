"""`Workspace`: which coordinator, with which credentials."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .. import errors
from .._http import Connection, config_dir


class Workspace:
    """A coordinator, as the managed service's workspace.

    ``Workspace(endpoint=...)`` names one; the service's ``subscription_id``,
    ``resource_group`` and ``workspace_name`` are accepted (and kept as names) so
    scripts run unchanged. Token and CA are found as the CLI finds them
    (``SHOAL_TOKEN``, ``SHOAL_CA_FILE``, or what ``shoal up``/``shoal login`` saved).
    """

    def __init__(
        self,
        subscription_id: str | None = None,
        resource_group: str | None = None,
        workspace_name: str | None = None,
        auth: object | None = None,
        *,
        endpoint: str | None = None,
        token: str | None = None,
        ca_file: str | os.PathLike[str] | None = None,
    ) -> None:
        self.subscription_id = subscription_id
        self.resource_group = resource_group
        self.name = workspace_name or "shoal"
        self._connection = Connection(endpoint, token, ca_file)

    @property
    def endpoint(self) -> str:
        return self._connection.endpoint

    @classmethod
    def from_config(
        cls,
        path: str | os.PathLike[str] | None = None,
        auth: object | None = None,
        _logger: object | None = None,
        _file_name: str | None = None,
    ) -> Workspace:
        """The workspace a ``config.json`` names: ``{"endpoint": ..., "token"?: ..., "ca_file"?: ...}``.

        Looked for as the service looks: ``path`` (a file or a folder), else
        ``config.json`` or ``.azureml/config.json`` in this folder and each one
        above it; else the endpoint ``shoal login`` saved, or ``SHOAL_ENDPOINT``.
        """
        name = _file_name or "config.json"
        candidates: list[Path] = []
        if path is not None:
            given = Path(path)
            candidates = [given] if given.is_file() else [given / name, given / ".azureml" / name]
        else:
            here = Path.cwd()
            for folder in [here, *here.parents]:
                candidates += [folder / name, folder / ".azureml" / name]
        for candidate in candidates:
            if candidate.is_file():
                try:
                    config: dict[str, Any] = json.loads(candidate.read_text())
                except ValueError as e:
                    raise errors.ValidationError(f"{candidate} is not JSON: {e}") from e
                ca = config.get("ca_file")
                if ca:
                    ca = str((candidate.parent / str(ca)).resolve())
                return cls(
                    config.get("subscription_id"),
                    config.get("resource_group"),
                    config.get("workspace_name"),
                    endpoint=config.get("endpoint"),
                    token=config.get("token"),
                    ca_file=ca,
                )
        if path is not None:
            raise errors.ValidationError(f"no {name} at {path}")
        saved = config_dir()
        if os.environ.get("SHOAL_ENDPOINT") or (saved and (saved / "config.json").is_file()):
            return cls()
        raise errors.ValidationError(
            f"no {name} here or in any folder above, and no saved endpoint: write "
            '{"endpoint": "http://HOST:7070"} to config.json, run `shoal login`, or set SHOAL_ENDPOINT'
        )

    @property
    def compute_targets(self) -> dict[str, Any]:
        """Every cluster, by name."""
        from .compute import AmlCompute

        return {c.name: c for c in AmlCompute.list(self)}

    def create_user_assigned_identity(self, name: str) -> dict[str, Any]:
        """Shoal's own: a user-assigned identity (``shoal identity create``). Clusters
        name it by name, client id, or a resource id ending in its name."""
        made: dict[str, Any] = self._connection.json("POST", "/api/v1/identities", json_body={"name": name})
        return made

    def list_user_assigned_identities(self) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = self._connection.json("GET", "/api/v1/identities")
        return found

    def get_quotas(self) -> list[dict[str, Any]]:
        """Shoal's own: each core quota (``family NAME``, ``low-priority``, ``total``), its limit and use."""
        from .. import _clusters

        return _clusters.quotas(self._connection)

    def set_quota(
        self,
        family: str | None = None,
        cores: int | None = None,
        low_priority_cores: int | None = None,
        total_cores: int | None = None,
    ) -> list[dict[str, Any]]:
        """Shoal's own: set a VM family's dedicated cores, the low-priority cores, or the total."""
        from .. import _clusters
        from .._util import drop_none

        change = drop_none(
            {
                "family": family,
                "family_cores": cores,
                "low_priority_cores": low_priority_cores,
                "total_cores": total_cores,
            }
        )
        return _clusters.set_quotas(self._connection, change)

    def get_details(self) -> dict[str, Any]:
        return {"name": self.name, "endpoint": self.endpoint}

    def __repr__(self) -> str:
        return f"Workspace.create(name='{self.name}', endpoint='{self.endpoint}')"
