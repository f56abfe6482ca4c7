"""Shoal's run_function driver: the managed service's parallel task, on Shoal's
parallel engine (worker mode).

Started once per worker as `python3 -u -c "$SHOAL_RUN_FUNCTION" ENTRY_SCRIPT ARGS...`
in the job's code folder. It imports the entry script once, calls its `init()`,
then for each mini-batch Shoal writes on stdin (the path of a file of its items,
one per line: a folder input's file paths, or a file input's lines; a table's
rows as a CSV with its header) calls `run(mini_batch)` with the items as a list
(a table's as a pandas DataFrame) and prints what `run` returns as
result rows (a list: one row per element; a pandas DataFrame: its rows as CSV
without the header), then `SHOAL_MINI_BATCH_DONE`. An exception fails the
mini-batch (`SHOAL_MINI_BATCH_FAILED` and the reason; Shoal retries it). The
entry script's own prints go to stderr (the job's log), never among the rows.
`shutdown()` is called at the end, if defined. Standard library only.
"""

import importlib.util
import os
import sys
import traceback

DONE = "SHOAL_MINI_BATCH_DONE"
TABULAR = os.environ.get("SHOAL_RUN_FUNCTION_INPUT") == "tabular"
DELIMITER = os.environ.get("SHOAL_RUN_FUNCTION_DELIMITER") or ","
FAILED = "SHOAL_MINI_BATCH_FAILED"


def load(entry_script):
    path = os.path.abspath(entry_script)
    if not os.path.exists(path):
        raise SystemExit(f"run_function: entry script {entry_script} is not in the code folder")
    sys.path.insert(0, os.path.dirname(path))
    spec = importlib.util.spec_from_file_location(
        os.path.splitext(os.path.basename(path))[0], path
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not callable(getattr(module, "run", None)):
        raise SystemExit(f"run_function: {entry_script} defines no run(mini_batch)")
    return module


def rows_of(result):
    """The rows `run` returned: a DataFrame's as CSV lines, a list's items."""
    if result is None:
        return []
    if hasattr(result, "to_csv"):
        text = result.to_csv(header=False, index=False)
        return [line for line in text.splitlines() if line]
    if isinstance(result, (str, bytes)):
        result = [result]
    rows = []
    for item in result:
        text = item.decode() if isinstance(item, bytes) else str(item)
        rows.append(text.replace("\n", " "))
    return rows


def main():
    if len(sys.argv) < 2:
        raise SystemExit("run_function: no entry script")
    entry_script = sys.argv[1]
    # The entry script sees its program_arguments as its own argv.
    sys.argv = [entry_script] + sys.argv[2:]
    rows_out = sys.stdout
    sys.stdout = sys.stderr
    module = load(entry_script)
    if callable(getattr(module, "init", None)):
        module.init()
    for line in sys.stdin:
        path = line.strip()
        if not path:
            continue
        try:
            if TABULAR:
                import pandas

                items = pandas.read_csv(path, sep=DELIMITER)
            else:
                with open(path, encoding="utf-8") as f:
                    items = [item.rstrip("\n") for item in f if item.strip()]
            rows = rows_of(module.run(items))
            missing = max(0, len(items) - len(rows))
            if missing:
                # Items without a result count as failed against error_threshold.
                print(
                    f"run_function: run() returned {len(rows)} results for {len(items)} items",
                    file=sys.stderr,
                )
            for row in rows:
                rows_out.write(row + "\n")
            rows_out.write(f"{DONE} missing={missing}\n" if missing else DONE + "\n")
        except Exception as error:  # the mini-batch fails; Shoal retries it
            traceback.print_exc()
            reason = f"{type(error).__name__}: {error}".replace("\n", " ")
            rows_out.write(f"{FAILED} {reason}\n")
        rows_out.flush()
    if callable(getattr(module, "shutdown", None)):
        module.shutdown()


main()
