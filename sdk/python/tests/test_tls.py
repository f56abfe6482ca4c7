"""A coordinator under TLS: the SDK checks its certificate with the CA `shoal up --tls` saved."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from conftest import Coordinator

from shoal import ConnectionFailed
from shoal.core import Workspace


@pytest.fixture
def tls_coordinator(monkeypatch: pytest.MonkeyPatch):
    root = Path(tempfile.mkdtemp(prefix="shoal-sdk-tls-"))
    running = Coordinator(root, ("--tls",))
    running.start()
    monkeypatch.setenv("SHOAL_CONFIG_DIR", str(running.config_dir))
    monkeypatch.setenv("SHOAL_ENDPOINT", running.endpoint)
    try:
        yield running
    finally:
        running.stop()
        shutil.rmtree(root, ignore_errors=True)


def test_tls_with_the_saved_ca_and_without(tls_coordinator, monkeypatch: pytest.MonkeyPatch) -> None:
    assert tls_coordinator.endpoint.startswith("https://")
    ws = Workspace.from_config()
    assert ws.compute_targets == {}
    ca = json.loads((tls_coordinator.config_dir / "ca-files.json").read_text())[tls_coordinator.endpoint]
    # The CA given by hand, the token from the environment: no saved files needed.
    token = json.loads((tls_coordinator.config_dir / "credentials.json").read_text())[tls_coordinator.endpoint]
    monkeypatch.setenv("SHOAL_CONFIG_DIR", str(tls_coordinator.root / "elsewhere"))
    assert Workspace(endpoint=tls_coordinator.endpoint, token=token, ca_file=ca).compute_targets == {}
    monkeypatch.setenv("SHOAL_CA_FILE", ca)
    monkeypatch.setenv("SHOAL_TOKEN", token)
    assert Workspace().compute_targets == {}
    # No CA: the certificate is refused, and the message says how to reach it.
    monkeypatch.delenv("SHOAL_CA_FILE")
    with pytest.raises(ConnectionFailed) as refused:
        Workspace().compute_targets  # noqa: B018
    assert "not signed by the CA" in refused.value.message
    assert os.environ["SHOAL_ENDPOINT"] in refused.value.message
