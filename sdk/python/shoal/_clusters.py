"""Cluster operations, once: `ComputeTarget` (v1) and `MLClient.compute` (v2) call these."""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO
from urllib.parse import quote

from ._http import Connection


def _path(name: str) -> str:
    return f"/api/v1/clusters/{quote(name, safe='')}"


def create(conn: Connection, body: dict[str, Any]) -> dict[str, Any]:
    """`POST /api/v1/clusters`: the coordinator checks the name, size, bounds and identities."""
    made: dict[str, Any] = conn.json("POST", "/api/v1/clusters", json_body=body)
    return made


def get(conn: Connection, name: str) -> dict[str, Any]:
    found: dict[str, Any] = conn.json("GET", _path(name))
    return found


def list_clusters(conn: Connection) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = conn.json("GET", "/api/v1/clusters")
    return found


def update(conn: Connection, name: str, patch: dict[str, Any]) -> dict[str, Any]:
    changed: dict[str, Any] = conn.json("PATCH", _path(name), json_body=patch)
    return changed


def delete(conn: Connection, name: str) -> dict[str, Any]:
    gone: dict[str, Any] = conn.json("DELETE", _path(name))
    return gone


def identities(conn: Connection, name: str) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = conn.json("GET", f"{_path(name)}/identities")["identities"]
    return found


def assign_identities(conn: Connection, name: str, section: dict[str, Any]) -> list[dict[str, Any]]:
    """``section``: ``{"type": "SystemAssigned,UserAssigned", "user_assigned_identities": [...]}``
    (the coordinator reads it as it reads a compute file's ``identity``)."""
    found: list[dict[str, Any]] = conn.json("POST", f"{_path(name)}/identities", json_body=section)["identities"]
    return found


def remove_identity(conn: Connection, name: str, identity: str) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = conn.json("DELETE", f"{_path(name)}/identities/{quote(identity, safe='')}")[
        "identities"
    ]
    return found


def vm_sizes(conn: Connection) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = conn.json("GET", "/api/v1/vm-sizes")
    return found


def status_line(cluster: dict[str, Any]) -> str:
    counts = cluster.get("node_state_counts") or {}
    states = ", ".join(f"{k} {v}" for k, v in counts.items() if v)
    return (
        f"{cluster['name']}: {cluster['allocation_state']}, "
        f"{cluster['current_node_count']} of {cluster['target_node_count']} nodes" + (f" ({states})" if states else "")
    )


def wait_steady(
    conn: Connection,
    name: str,
    show_output: bool = False,
    timeout: float | None = None,
    out: TextIO | None = None,
) -> dict[str, Any]:
    """Until the cluster is steady with at least `min_nodes` ready (the service's provisioning wait)."""
    out = out or sys.stdout
    deadline = None if timeout is None else time.monotonic() + timeout
    last = ""
    while True:
        cluster = get(conn, name)
        line = status_line(cluster)
        if show_output and line != last:
            print(line, file=out, flush=True)
            last = line
        if cluster.get("errors"):
            return cluster
        ready = (cluster.get("node_state_counts") or {}).get("idle", 0) + (cluster.get("node_state_counts") or {}).get(
            "running", 0
        )
        if cluster["allocation_state"] == "steady" and ready >= cluster["min_nodes"]:
            if show_output:
                print("Succeeded", file=out, flush=True)
            return cluster
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"cluster {name} is still {line} after {timeout} s")
        time.sleep(0.2)


def nodes(conn: Connection, name: str) -> list[dict[str, Any]]:
    """The cluster's nodes: state, what they run, CPU, memory and GPU readings."""
    found: list[dict[str, Any]] = conn.json("GET", "/api/v1/nodes", params={"cluster": name})
    return found


def lock(conn: Connection, name: str, kind: str) -> dict[str, Any]:
    """``kind``: ``cannot-delete`` (no delete) or ``read-only`` (no change, no scaling)."""
    locked: dict[str, Any] = conn.json("PUT", f"{_path(name)}/lock", json_body={"kind": kind})
    return locked


def unlock(conn: Connection, name: str) -> dict[str, Any]:
    unlocked: dict[str, Any] = conn.json("DELETE", f"{_path(name)}/lock")
    return unlocked


def quotas(conn: Connection) -> list[dict[str, Any]]:
    """Each quota's scope (``family NAME``, ``low-priority``, ``total``), limit, use and what is left."""
    found: list[dict[str, Any]] = conn.json("GET", "/api/v1/quotas")
    return found


def set_quotas(conn: Connection, change: dict[str, Any]) -> list[dict[str, Any]]:
    """``{"family": NAME, "family_cores": N}``, ``{"low_priority_cores": N}``, ``{"total_cores": N}``."""
    found: list[dict[str, Any]] = conn.json("PUT", "/api/v1/quotas", json_body=change)
    return found
