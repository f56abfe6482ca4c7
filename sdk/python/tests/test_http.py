"""The HTTP API the SDK stands on: uploads, the local paths a file names, logs that follow."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from shoal import AuthenticationError, ConnectionFailed, ValidationError
from shoal._http import Connection
from shoal._jobs import ShoalWarning
from shoal.ml import JobFile, MLClient, command
from shoal.ml.entities import AmlCompute


def test_local_paths_lists_what_to_send(coordinator) -> None:
    conn = Connection()
    job = {
        "command": "python t.py ${{inputs.d}}",
        "code": "./src",
        "inputs": {"d": {"type": "uri_file", "path": "./rows.csv"}, "lr": 0.1},
        "compute": "x",
    }
    paths = conn.json("POST", "/api/v1/local-paths", content=json.dumps(job))
    assert {(p["field"], p["path"], p["folder"]) for p in paths} == {
        ("code", "./src", True),
        ("inputs.d.path", "./rows.csv", False),
    }


def test_multipart_mistakes_are_named(coordinator) -> None:
    conn = Connection()
    with pytest.raises(ValidationError, match="no `spec` part"):
        conn.request("POST", "/api/v1/jobs", files=[("set", (None, b"a=b", "text/plain"))])
    with pytest.raises(ValidationError, match="unknown part `blob`"):
        conn.request(
            "POST",
            "/api/v1/jobs",
            files=[("spec", (None, b"command: ls", "text/plain")), ("blob", ("x", b"1", "text/plain"))],
        )
    with pytest.raises(ValidationError, match="local path"):
        conn.request(
            "POST",
            "/api/v1/jobs",
            files=[("spec", (None, b"command: ls\ncode: ./src\ncompute: x", "text/plain"))],
        )


def test_logs_follow_a_running_job(coordinator, unique: str) -> None:
    ml_client = MLClient.from_config()
    ml_client.compute.begin_create_or_update(AmlCompute(name=unique, size="STANDARD_D2_V2", max_instances=1)).result()
    job = ml_client.jobs.create_or_update(command(command="echo first; sleep 1; echo second", compute=unique))
    conn = Connection()
    seen: list[tuple[float, str]] = []
    started = time.monotonic()
    with conn.stream(f"/api/v1/jobs/{job.name}/logs", {"follow": "true"}) as response:
        for text in response.iter_text():
            seen.append((time.monotonic() - started, text))
    joined = "".join(t for _, t in seen)
    assert "first" in joined and "second" in joined
    first_at = next(at for at, t in seen if "first" in t)
    second_at = next(at for at, t in seen if "second" in t)
    # Lines arrive as written (a second apart), not all at the end.
    assert second_at - first_at > 0.5, seen
    assert ml_client.jobs.get(job.name).status == "Completed"


def test_warnings_reach_the_caller(coordinator, unique: str, workdir: Path) -> None:
    ml_client = MLClient.from_config()
    ml_client.compute.begin_create_or_update(AmlCompute(name=unique, size="STANDARD_D2_V2", max_instances=1)).result()
    doc = command(command="true", compute=unique).to_job(workdir)
    doc["services"] = {"my_jupyter": {"type": "jupyter_lab"}}
    with pytest.warns(ShoalWarning, match="services") as caught:
        ml_client.jobs.create_or_update(JobFile(doc, workdir, "inline"))
    # The coordinator's sentence, whole (it travels percent-encoded).
    assert "(ssh, jupyter, tensorboard) are not offered; follow the job with `shoal job logs -f`" in str(
        caught[0].message
    )


def _token(coordinator, role: str) -> str:
    import os
    import subprocess

    from conftest import _binary

    made = subprocess.run(
        [_binary(), "-o", "json", "token", "create", "--role", role, "--name", f"sdk-{role}"],
        env=dict(os.environ, SHOAL_ENDPOINT=coordinator.endpoint),
        capture_output=True,
        text=True,
        check=True,
    )
    return str(json.loads(made.stdout)["token"])


def test_a_user_token_submits_with_uploads_but_makes_no_clusters(coordinator, unique: str, workdir: Path) -> None:
    admin = MLClient.from_config()
    admin.compute.begin_create_or_update(AmlCompute(name=unique, size="STANDARD_D2_V2", max_instances=1)).result()
    user = MLClient(endpoint=coordinator.endpoint, token=_token(coordinator, "user"))
    (workdir / "src").mkdir()
    (workdir / "src" / "a.txt").write_text("uploaded\n")
    job = user.jobs.create_or_update(command(command="cat a.txt", code="./src", compute=unique))
    import io

    out = io.StringIO()
    user.jobs.stream(job.name, out=out)
    assert "uploaded" in out.getvalue()
    from shoal import AuthenticationError

    with pytest.raises(AuthenticationError, match="needs admin"):
        user.compute.begin_create_or_update(AmlCompute(name=f"{unique}-x", size="STANDARD_D2_V2", max_instances=1))
    with pytest.raises(AuthenticationError, match="does not accept"):
        MLClient(endpoint=coordinator.endpoint, token="shoal_nope_nope").jobs.get(job.name)


def test_tokens_over_http_are_an_admins(coordinator, unique: str) -> None:
    admin = Connection()
    made = admin.json("POST", "/api/v1/tokens", json_body={"role": "reader", "name": unique})
    assert made["token"].startswith("shoal_") and made["info"]["role"] == "reader"
    listed = {t["id"]: t for t in admin.json("GET", "/api/v1/tokens")}
    assert listed[made["info"]["id"]]["name"] == unique and not listed[made["info"]["id"]]["revoked"]
    reader = Connection(endpoint=coordinator.endpoint, token=made["token"])
    assert isinstance(reader.json("GET", "/api/v1/clusters"), list)
    with pytest.raises(AuthenticationError, match="needs admin"):
        reader.json("GET", "/api/v1/tokens")
    revoked = admin.json("DELETE", f"/api/v1/tokens/{made['info']['id']}")
    assert revoked["revoked"]
    with pytest.raises(AuthenticationError, match="revoked"):
        reader.json("GET", "/api/v1/clusters")


def test_a_list_of_endpoints_goes_on_past_one_that_cannot_be_reached(coordinator) -> None:
    import socket

    def free() -> str:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return f"127.0.0.1:{s.getsockname()[1]}"

    dead = free()
    conn = Connection(endpoint=f"{dead},{coordinator.endpoint}")
    clusters = conn.json("GET", "/api/v1/clusters")
    assert isinstance(clusters, (list, dict)), clusters
    assert conn.endpoint == coordinator.endpoint, "it stays with the one that answered"
    # None answers: the error names each.
    other = free()
    with pytest.raises(ConnectionFailed) as failed:
        Connection(endpoint=f"{dead},{other}").json("GET", "/api/v1/clusters")
    assert dead in str(failed.value) and other in str(failed.value)
