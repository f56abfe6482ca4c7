#!/usr/bin/env python3
"""Where one `shoal job submit --wait -- true` spends its time, segment by segment.

    bench/latency_breakdown.py [--shoal target/release/shoal] [--runs 40] [--quiet-ms 0]

Starts a coordinator with one warm local node, then runs the CLI RUNS times under
`perf record` of a few scheduler and system-call tracepoints (a handful of events
a run, so the tracing does not move the figures as `strace` does), and cuts each
run at the points the processes leave in the kernel:

  0 the CLI's exec -> its connect        the CLI process starting
  1 connect -> the create read            the connection and the request
  2 create read -> first fdatasync        admission, the control loop's pass
  3 first fdatasync                       the job made durable
  4 -> the agent reads the launch         the launch sent
  5 -> the agent's clone                  its working folder and pipes
  6 clone -> exec                         the child's set-up and exec
  7 exec -> exit                          `true` itself
  8 exit -> the agent's report            reaping, outputs checked
  9 report -> second fdatasync            the loop's pass
  a second fdatasync                      the end made durable
  b -> the coordinator's reply write      the watcher woken
  c -> the CLI's exit                     printing, exiting

and prints each segment's median over the runs. Needs `perf` and the right to
trace the whole machine (root, or kernel.perf_event_paranoid = -1). Issue 17 (c).
"""

import argparse
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

EVENTS = [
    "sched:sched_process_exec",
    "sched:sched_process_exit",
    "syscalls:sys_exit_recvfrom",
    "syscalls:sys_enter_writev",
    "syscalls:sys_enter_clone",
    "syscalls:sys_enter_fdatasync",
    "syscalls:sys_exit_fdatasync",
    "syscalls:sys_enter_connect",
]

SEGMENTS = [
    ("0 CLI exec -> connect", "exec", "connect"),
    ("1 connect -> create read", "connect", "request"),
    ("2 create read -> fdatasync", "request", "sync1"),
    ("3 fdatasync (job made)", "sync1", "synced1"),
    ("4 -> agent reads launch", "synced1", "launch"),
    ("5 -> agent's clone", "launch", "clone"),
    ("6 clone -> exec of true", "clone", "true_exec"),
    ("7 true: exec -> exit", "true_exec", "true_exit"),
    ("8 -> agent's report", "true_exit", "report"),
    ("9 report -> fdatasync", "report", "sync2"),
    ("a fdatasync (end made)", "sync2", "synced2"),
    ("b -> reply written", "synced2", "reply"),
    ("c -> CLI exits", "reply", "cli_exit"),
]


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_coordinator(shoal, data):
    address = f"127.0.0.1:{free_port()}"
    coordinator = subprocess.Popen(
        [shoal, "coordinator", "--listen", address, "--data-dir", data],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    token_file = os.path.join(data, "admin.token")
    for _ in range(300):
        if os.path.exists(token_file):
            break
        time.sleep(0.1)
    else:
        sys.exit("the coordinator did not come up")
    env = dict(os.environ, SHOAL_ENDPOINT=address)
    with open(token_file) as f:
        env["SHOAL_TOKEN"] = f.read().strip()
    subprocess.run(
        [shoal, "cluster", "create", "-n", "warm", "--min-nodes", "1",
         "--max-nodes", "1", "-s", "Standard_D2_v2"],
        env=env, check=True, stdout=subprocess.DEVNULL,
    )
    return coordinator, env


def submit_command(shoal):
    return [shoal, "job", "submit", "--cluster", "warm", "--wait", "-o", "json", "--", "true"]


def parse(text):
    """(time ms, comm, pid, tid, event) for each line of `perf script`."""
    line = re.compile(r"\s*(\S+)\s+(\d+)/(\d+)\s+([\d.]+):\s+(\S+):")
    events = []
    for raw in text.splitlines():
        m = line.match(raw)
        if m:
            comm, pid, tid, at, event = m.groups()
            events.append((float(at) * 1000.0, comm, pid, tid, event))
    return events


def cut(events, coordinator, agent):
    """Each run's points, in order; a run missing one is left out."""
    runs = []
    i, n = 0, len(events)

    def first(start, test):
        for k in range(start, n):
            if test(events[k]):
                return k
        return None

    while True:
        k = first(i, lambda e: e[4] == "sched:sched_process_exec" and e[1] == "shoal"
                  and e[2] not in (coordinator, agent))
        if k is None:
            break
        cli = events[k][2]
        points = {"exec": k}
        order = [
            ("connect", lambda e: e[4] == "syscalls:sys_enter_connect" and e[2] == cli),
            ("sync1", lambda e: e[4] == "syscalls:sys_enter_fdatasync" and e[2] == coordinator),
            ("synced1", lambda e: e[4] == "syscalls:sys_exit_fdatasync" and e[2] == coordinator),
            ("launch", lambda e: e[4] == "syscalls:sys_exit_recvfrom" and e[3] == agent),
            ("clone", lambda e: e[4] == "syscalls:sys_enter_clone" and e[3] == agent),
            ("true_exec", lambda e: e[4] == "sched:sched_process_exec" and e[1] == "true"),
            ("true_exit", lambda e: e[4] == "sched:sched_process_exit" and e[1] == "true"),
            ("report", lambda e: e[4] == "syscalls:sys_enter_writev" and e[3] == agent),
            ("sync2", lambda e: e[4] == "syscalls:sys_enter_fdatasync" and e[2] == coordinator),
            ("synced2", lambda e: e[4] == "syscalls:sys_exit_fdatasync" and e[2] == coordinator),
            ("reply", lambda e: e[4] == "syscalls:sys_enter_writev" and e[2] == coordinator),
            ("cli_exit", lambda e: e[4] == "sched:sched_process_exit" and e[2] == cli and e[3] == cli),
        ]
        at = k
        for name, test in order:
            found = first(at, test)
            if found is None:
                return runs
            points[name] = found
            at = found
        # The create's request: the coordinator's last read before its first sync.
        reads = [q for q in range(points["connect"], points["sync1"])
                 if events[q][2] == coordinator and events[q][4] == "syscalls:sys_exit_recvfrom"]
        points["request"] = reads[-1] if reads else points["sync1"]
        runs.append({name: events[q][0] for name, q in points.items()})
        i = points["cli_exit"] + 1
    return runs


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shoal", default="target/release/shoal")
    parser.add_argument("--runs", type=int, default=40)
    parser.add_argument("--quiet-ms", type=float, default=0.0,
                        help="quiet before each run (a machine idle a moment wakes slower)")
    args = parser.parse_args()
    if shutil.which("perf") is None:
        sys.exit("perf is not installed (apt-get install linux-perf)")
    shoal = os.path.abspath(args.shoal)
    with tempfile.TemporaryDirectory() as scratch:
        coordinator, env = start_coordinator(shoal, os.path.join(scratch, "data"))
        try:
            command = submit_command(shoal)
            for _ in range(100):  # the node comes up
                if subprocess.run(command, env=env, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL).returncode == 0:
                    break
                time.sleep(0.2)
            for _ in range(5):
                subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)
            agent = subprocess.run(["pgrep", "-f", f"shoal agent .*{env['SHOAL_ENDPOINT']}"],
                                   capture_output=True, text=True).stdout.split()
            if not agent:
                sys.exit("no agent found for the warm node")
            quiet = args.quiet_ms / 1000.0
            loop = " ".join(command)
            script = (f"for i in $(seq {args.runs}); do sleep {quiet}; "
                      f"{loop} >/dev/null || exit 1; done")
            data = os.path.join(scratch, "perf.data")
            record = ["perf", "record", "-q", "-a", "-o", data]
            for event in EVENTS:
                record += ["-e", event]
            recorded = subprocess.run(record + ["--", "sh", "-c", script], env=env,
                                      stderr=subprocess.PIPE, text=True)
            if recorded.returncode != 0:
                sys.exit("perf record failed (tracing the whole machine needs root, or "
                         "kernel.perf_event_paranoid = -1):\n" + recorded.stderr[-2000:])
            text = subprocess.run(["perf", "script", "-i", data, "-F", "comm,pid,tid,time,event"],
                                  capture_output=True, text=True).stdout
        finally:
            os.killpg(coordinator.pid, signal.SIGTERM)
            coordinator.wait(timeout=30)
    runs = cut(parse(text), str(coordinator.pid), agent[0])
    if not runs:
        sys.exit("no complete run in the trace")
    print(f"`shoal job submit --wait -- true`, {len(runs)} runs, "
          f"{args.quiet_ms:g} ms quiet before each: median (p25-p75) ms")
    for name, start, end in SEGMENTS:
        spans = sorted(run[end] - run[start] for run in runs)
        print(f"  {name:28s} {statistics.median(spans):6.3f} "
              f"({spans[len(spans) // 4]:.3f}-{spans[3 * len(spans) // 4]:.3f})")
    totals = sorted(run["cli_exit"] - run["exec"] for run in runs)
    print(f"  {'total, exec to exit':28s} {statistics.median(totals):6.3f} "
          f"({totals[len(totals) // 4]:.3f}-{totals[3 * len(totals) // 4]:.3f})")


if __name__ == "__main__":
    main()
