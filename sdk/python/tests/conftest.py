"""A real `shoal up` per test session, and what each test needs to reach it."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]


def _binary() -> str:
    binary = os.environ.get("SHOAL_BIN") or str(ROOT / "target" / "debug" / "shoal")
    if not os.access(binary, os.X_OK):
        pytest.fail(f"no shoal binary at {binary}: run `cargo build --bin shoal` or set SHOAL_BIN")
    return binary


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Coordinator:
    def __init__(self, root: Path, args: tuple[str, ...] = ()) -> None:
        self.root = root
        self.args = args
        self.port = _free_port()
        scheme = "https" if "--tls" in args else "http"
        self.endpoint = f"{scheme}://127.0.0.1:{self.port}"
        self.config_dir = root / "config"
        self.log = root / "coordinator.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = dict(os.environ, SHOAL_CONFIG_DIR=str(self.config_dir), SHOAL_LOG="info")
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    _binary(),
                    "up",
                    "--listen",
                    f"127.0.0.1:{self.port}",
                    "--data-dir",
                    str(self.root / "data"),
                    *self.args,
                ],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        # Ready: the port answers, and the token (and the CA, under TLS) are saved.
        saved = [self.config_dir / "credentials.json"]
        if "--tls" in self.args:
            saved.append(self.config_dir / "ca-files.json")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"shoal up exited: {self.log.read_text()[-2000:]}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                if all(path.exists() for path in saved):
                    return
            except OSError:
                pass
            time.sleep(0.05)
        pytest.fail(f"shoal up did not answer in 30 s: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


@pytest.fixture(scope="session")
def coordinator() -> Iterator[Coordinator]:
    root = Path(tempfile.mkdtemp(prefix="shoal-sdk-test-"))
    running = Coordinator(root)
    running.start()
    saved = {k: os.environ.get(k) for k in ("SHOAL_CONFIG_DIR", "SHOAL_ENDPOINT", "SHOAL_TOKEN")}
    # The SDK finds the endpoint and token as the CLI does: what `shoal up` saved.
    os.environ["SHOAL_CONFIG_DIR"] = str(running.config_dir)
    os.environ["SHOAL_ENDPOINT"] = running.endpoint
    os.environ.pop("SHOAL_TOKEN", None)
    try:
        yield running
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        running.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def unique() -> str:
    """A name no other test uses (clusters live as long as the session's coordinator)."""
    return "t" + uuid.uuid4().hex[:8]


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The test's own folder as the current one (where relative paths start)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path
