"""Job operations, once: the v1 (`Run`) and v2 (`MLClient.jobs`) names both call these."""

from __future__ import annotations

import json
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import quote, unquote

from tqdm.auto import tqdm

from . import _files, errors
from ._http import Connection

FINAL = frozenset({"completed", "failed", "canceled", "timed_out"})

# The managed service's names for a job's states (`Run.get_status()`, `job.status`).
SERVICE_STATUS = {
    "queued": "Queued",
    "preparing": "Preparing",
    "running": "Running",
    "canceling": "CancelRequested",
    "completed": "Completed",
    "failed": "Failed",
    "canceled": "Canceled",
    "timed_out": "Failed",
}


class ShoalWarning(UserWarning):
    """A key the coordinator accepted that has no effect here, and why."""


def submit(conn: Connection, doc: dict[str, Any], base: Path, sets: tuple[str, ...] = ()) -> dict[str, Any]:
    """A job file (as a mapping, its relative paths from `base`) admitted with its local paths.

    The coordinator's own admission reads it, as for `shoal job submit -f`: the
    answer is the job as `GET /api/v1/jobs/ID` shows it.
    """
    _files.prepare(doc, base)
    text = json.dumps(doc)
    parts: list[_files.Part] = [_files.spec_part(text)]
    parts.extend(("set", (None, line.encode(), "text/plain")) for line in sets)
    asked = conn.json("POST", "/api/v1/local-paths", files=list(parts))
    for local in asked:
        field, path, folder = str(local["field"]), str(local["path"]), bool(local["folder"])
        is_code = field == "code" or field.endswith(".code")
        if any(p[1][0] == path for p in parts):
            continue
        parts.append(_files.local_part(base, path, folder, is_code, field))
    response = conn.request("POST", "/api/v1/jobs", files=parts, timeout=600.0)
    for warning in response.headers.get_list("x-shoal-warning"):
        warnings.warn(unquote(warning), ShoalWarning, stacklevel=3)
    job: dict[str, Any] = response.json()
    return job


def get(conn: Connection, job_id: str) -> dict[str, Any]:
    job: dict[str, Any] = conn.json("GET", f"/api/v1/jobs/{quote(job_id, safe='')}")
    return job


def list_jobs(conn: Connection, parent: str | None = None, cluster: str | None = None) -> Iterator[dict[str, Any]]:
    """Newest first, every page."""
    params: dict[str, Any] = {"limit": 1000}
    if parent:
        params["parent"] = parent
    if cluster:
        params["cluster"] = cluster
    while True:
        response = conn.request("GET", "/api/v1/jobs", params=params)
        yield from response.json()
        after = response.headers.get("x-next-after")
        if not after:
            return
        params["after"] = after


def cancel(conn: Connection, job_id: str) -> dict[str, Any]:
    job: dict[str, Any] = conn.json("POST", f"/api/v1/jobs/{quote(job_id, safe='')}/cancel")
    return job


def _units(job: dict[str, Any]) -> tuple[int, int, str] | None:
    """What a job is made of, for a progress bar: (done, total, what)."""
    ended = FINAL | {"not run"}
    if job.get("progress"):
        p = job["progress"]
        return int(p["done"]) + int(p["failed"]), int(p["mini_batches"]), "mini-batches"
    if job.get("sweep"):
        sweep = job["sweep"]
        done = sum(1 for t in sweep["trials"] if t["status"] in ended)
        return done, int(sweep["max_total_trials"]), "trials"
    if job.get("pipeline"):
        steps = job["pipeline"]["steps"]
        return sum(1 for s in steps if s["status"] in ended), len(steps), "steps"
    return None


def wait(conn: Connection, job_id: str, timeout: float | None = None, progress: bool = True) -> dict[str, Any]:
    """Until the job ends (completed, failed, canceled, timed out): its last state.

    In a terminal or notebook, a bar shows its state, and its mini-batches,
    trials or steps as they end.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    delay = 0.05
    plain = "{desc} [{elapsed}]"
    with tqdm(desc=job_id, disable=None if progress else True, leave=False, bar_format=plain) as bar:
        while True:
            job = get(conn, job_id)
            units = _units(job)
            if units is not None:
                done, total, what = units
                bar.total = total
                bar.n = done
                bar.bar_format = "{desc}: {n_fmt}/{total_fmt} %s |{bar}| [{elapsed}]" % what
            bar.set_description_str(f"{job_id} {SERVICE_STATUS.get(job['status'], job['status'])}", refresh=True)
            if job["status"] in FINAL:
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} is still {job['status']} after {timeout} s")
            time.sleep(delay)
            delay = min(delay * 2, 1.0)


def stream(conn: Connection, job_id: str, out: TextIO | None = None) -> dict[str, Any]:
    """The job's log as it writes it, until it ends; then its last state."""
    out = out or sys.stdout
    job = get(conn, job_id)
    print(f"RunId: {job_id}", file=out)
    if job.get("name"):
        print(f"Name: {job['name']}", file=out)
    print(f"Status: {SERVICE_STATUS.get(job['status'], job['status'])}\n", file=out, flush=True)
    with conn.stream(f"/api/v1/jobs/{quote(job_id, safe='')}/logs", {"follow": "true"}) as response:
        for text in response.iter_text():
            out.write(text)
            out.flush()
    # The stream ends when the job does; the record may take a moment to say so.
    job = wait(conn, job_id, progress=False)
    print(f"\nExecution Summary\n=================\nRunId: {job_id}", file=out)
    print(f"Status: {SERVICE_STATUS.get(job['status'], job['status'])}", file=out, flush=True)
    return job


def explain(conn: Connection, job_id: str) -> list[str]:
    """Why it waits, runs where it runs, or ended as it did (``shoal job why``)."""
    lines: list[str] = conn.json("GET", f"/api/v1/jobs/{quote(job_id, safe='')}/why")["lines"]
    return lines


def logs(conn: Connection, job_id: str) -> str:
    return conn.request("GET", f"/api/v1/jobs/{quote(job_id, safe='')}/logs").text


def metrics(conn: Connection, job_id: str) -> dict[str, Any]:
    found: dict[str, Any] = conn.json("GET", f"/api/v1/jobs/{quote(job_id, safe='')}/metrics")
    return found


def latest_metrics(conn: Connection, job_id: str) -> dict[str, Any]:
    """Each metric's last value (a list where it was logged more than once, as `Run.get_metrics()`)."""
    found: dict[str, Any] = {}
    for run in metrics(conn, job_id).get("runs", []):
        for series in run.get("metrics", []):
            values = [point["value"] for point in series.get("points", [])]
            if values:
                found[series["name"]] = values[0] if len(values) == 1 else values
    return found


def _download(conn: Connection, path: str, what: str) -> bytes:
    with conn.stream(path) as response:
        total = int(response.headers.get("content-length") or 0) or None
        chunks = []
        with tqdm(total=total, unit="B", unit_scale=True, desc=what, disable=None, leave=False) as bar:
            for chunk in response.iter_bytes():
                chunks.append(chunk)
                bar.update(len(chunk))
    return b"".join(chunks)


def download(
    conn: Connection,
    job_id: str,
    download_path: str | Path = ".",
    output_name: str | None = None,
    all_outputs: bool = False,
) -> list[Path]:
    """A job's outputs, laid out as the managed service's ``jobs.download`` does.

    ``named-outputs/NAME/`` for a named output (``output_name``, or every one with
    ``all_outputs``); ``artifacts/outputs/instance-N/`` for what each instance wrote
    to ./outputs and ``artifacts/user_logs/std_log.txt`` for its log (the default,
    and with ``all_outputs``). Returns the folders written.
    """
    root = Path(download_path)
    job = get(conn, job_id)
    quoted = quote(job_id, safe="")
    written: list[Path] = []
    # A pipeline's outputs are the step outputs bound to them.
    names = list(job.get("outputs") or []) + list((job.get("pipeline") or {}).get("outputs") or {})
    if output_name is not None:
        if output_name not in names:
            raise errors.NotFoundError(
                f"job {job_id} has no output `{output_name}`; its outputs: " + (", ".join(names) or "none")
            )
        names = [output_name]
    elif not all_outputs:
        names = []
    for name in names:
        data = _download(conn, f"/api/v1/jobs/{quoted}/named-outputs/{quote(name, safe='')}", name)
        destination = root / "named-outputs" / name
        _files.extract(data, destination)
        written.append(destination)
    if output_name is None:
        artifacts = root / "artifacts"
        for instance in range(int(job.get("instance_count") or 0)):
            try:
                data = _download(conn, f"/api/v1/jobs/{quoted}/outputs/{instance}", f"instance {instance}")
            except errors.NotFoundError:
                continue  # wrote nothing to ./outputs
            destination = artifacts / "outputs" / f"instance-{instance}"
            _files.extract(data, destination)
            written.append(destination)
        log = artifacts / "user_logs" / "std_log.txt"
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(logs(conn, job_id))
        written.append(log.parent)
    return written
