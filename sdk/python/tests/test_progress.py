"""Waits show a progress bar in a terminal (a real pty, sized as a terminal is)."""

from __future__ import annotations

import fcntl
import os
import pty
import struct
import sys
import termios
import textwrap
from pathlib import Path

from shoal.ml import MLClient
from shoal.ml.entities import AmlCompute


def _in_a_terminal(script: Path, env: dict[str, str]) -> str:
    pid, fd = pty.fork()
    if pid == 0:  # the child: the script, on the pty
        os.execve(sys.executable, [sys.executable, str(script)], env)
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    out = b""
    while True:
        try:
            chunk = os.read(fd, 4096)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    os.waitpid(pid, 0)
    return out.decode(errors="replace").replace("\r", "\n")


def test_a_parallel_jobs_wait_counts_its_mini_batches(coordinator, unique: str, workdir: Path) -> None:
    MLClient.from_config().compute.begin_create_or_update(
        AmlCompute(name=unique, size="STANDARD_D2_V2", max_instances=2)
    ).result()
    script = workdir / "wait.py"
    script.write_text(
        textwrap.dedent(f"""
        import pathlib
        from shoal.core import Experiment, Workspace
        from shoal.core.run import Run
        from shoal.ml import Input, MLClient
        from shoal.ml.parallel import RunFunction, parallel_run_function
        pathlib.Path("files").mkdir()
        for i in range(8):
            pathlib.Path(f"files/{{i}}.txt").write_text(str(i))
        pathlib.Path("score").mkdir()
        pathlib.Path("score/s.py").write_text("import time\\ndef init(): pass\\ndef run(b):\\n    time.sleep(0.2)\\n    return b\\n")
        job = MLClient.from_config().jobs.create_or_update(parallel_run_function(
            inputs={{"f": Input(path="./files")}}, input_data="${{{{inputs.f}}}}", mini_batch_size="1",
            instance_count=2, task=RunFunction(code="./score", entry_script="s.py"), compute="{unique}"))
        run = Run(Experiment(Workspace.from_config(), "progress"), job.name)
        print("ended", run.wait_for_completion()["status"])
    """)
    )
    shown = _in_a_terminal(script, dict(os.environ))
    assert "ended Completed" in shown, shown
    assert "8/8 mini-batches |" in shown, shown
    assert "Running: " in shown, shown
