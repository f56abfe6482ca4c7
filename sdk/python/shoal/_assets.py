"""Registered environments and data assets, once: v1 and v2 both call these."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from . import _files, errors
from ._http import Connection


def find(conn: Connection, kind: str, name: str, version: str | None = None) -> dict[str, Any]:
    """The named asset (``kind``: environments, data): a version, else the latest."""
    found = [a for a in conn.json("GET", f"/api/v1/{kind}") if a.get("name") == name]
    if version is not None:
        found = [a for a in found if str(a.get("version")) == str(version)]
    if not found:
        what = "environment" if kind == "environments" else "data asset"
        raise errors.NotFoundError(f"no {what} `{name}`" + (f" version {version}" if version else ""))
    latest: dict[str, Any] = found[-1]
    return latest


def create_environment(conn: Connection, definition: dict[str, Any], base: Path) -> dict[str, Any]:
    """Register an environment file's definition; a build context is uploaded with it."""
    parts = [_files.spec_part(json.dumps(definition))]
    build = definition.get("build")
    if isinstance(build, dict) and isinstance(build.get("path"), str):
        parts.append(_files.local_part(base, build["path"], True, False, "build.path"))
    made: dict[str, Any] = conn.json("POST", "/api/v1/environments", files=parts, timeout=3600.0)
    return made


def create_data(conn: Connection, body: dict[str, Any], base: Path) -> dict[str, Any]:
    """Register a data asset; a local path is uploaded with it."""
    parts = [_files.spec_part(json.dumps(body))]
    path = str(body.get("path") or "")
    if path and "://" not in path and not path.startswith("azureml:"):
        folder = body.get("type") != "uri_file"
        parts.append(_files.local_part(base, path, folder, False, "path"))
    made: dict[str, Any] = conn.json("POST", "/api/v1/data", files=parts, timeout=600.0)
    return made
