"""The submitting machine's half of admission, as the CLI's `local` module does it.

A job file names local paths (its code, local data, component files, ``file:``
environments, conda files, build contexts): only this machine can read them, so
they are read here and sent with the file. What the keys mean and what is refused
is the coordinator's: it drafts the file, and tells which local paths it names
(``POST /api/v1/local-paths``).
"""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path
from typing import Any

import pathspec
import yaml

from . import errors

# The files whose patterns keep things out of a code snapshot, as the CLI reads them.
IGNORE_FILES = (".gitignore", ".amlignore", ".shoalignore")

Part = tuple[str, tuple[str | None, bytes, str]]


def read_document(path: str | os.PathLike[str], what: str) -> tuple[dict[str, Any], Path]:
    """A YAML (or JSON) file as a mapping, and the folder its relative paths start from."""
    file = Path(path)
    try:
        text = file.read_text()
    except OSError as e:
        raise errors.ValidationError(f"cannot read {what} {file}: {e.strerror}") from e
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise errors.ValidationError(f"{what} {file} is not YAML: {e}") from e
    if not isinstance(doc, dict):
        raise errors.ValidationError(f"{what} {file} is not a mapping of keys")
    return doc, file.resolve().parent


def _absolute(base: Path, path: str, field: str) -> str:
    full = (base / path).resolve()
    if not full.exists():
        raise errors.ValidationError(f"invalid {field}: {full} does not exist")
    return str(full)


def _inline_definition(env: dict[str, Any], base: Path, field: str) -> None:
    conda = env.get("conda_file")
    if isinstance(conda, str):
        env["conda_file"], _ = read_document(base / conda, f"conda file ({field}.conda_file)")
    build = env.get("build")
    if isinstance(build, dict) and isinstance(build.get("path"), str):
        build["path"] = _absolute(base, build["path"], f"{field}.build.path")


def _inline_environment(holder: Any, key: str, base: Path, field: str) -> None:
    if not isinstance(holder, dict):
        return
    env = holder.get(key)
    if isinstance(env, str) and env.strip().startswith("file:"):
        definition, folder = read_document(base / env.strip()[len("file:") :], f"environment file ({field})")
        _inline_definition(definition, folder, field)
        holder[key] = definition
    elif isinstance(env, dict):
        _inline_definition(env, base, field)


def _inline_environments(doc: dict[str, Any], base: Path) -> None:
    _inline_environment(doc, "environment", base, "environment")
    _inline_environment(doc.get("task"), "environment", base, "task.environment")
    steps = doc.get("jobs")
    if isinstance(steps, dict):
        for name, step in steps.items():
            _inline_environment(step, "environment", base, f"jobs.{name}.environment")


def _component_slots(doc: dict[str, Any]) -> list[tuple[dict[str, Any], str, str]]:
    """Where a job file names components (the coordinator's `component_slots`)."""
    slots: list[tuple[dict[str, Any], str, str]] = []
    if "trial" in doc:
        slots.append((doc, "trial", "trial"))
    steps = doc.get("jobs")
    if isinstance(steps, dict):
        for name, step in steps.items():
            if isinstance(step, dict):
                for key in ("component", "trial"):
                    if key in step:
                        slots.append((step, key, f"jobs.{name}.{key}"))
    return slots


def _inline_components(doc: dict[str, Any], base: Path) -> None:
    for holder, key, field in _component_slots(doc):
        reference = holder[key]
        if not isinstance(reference, str) or reference.startswith("azureml:"):
            continue
        path = reference.strip().removeprefix("file:")
        component, folder = read_document(base / path, f"component file ({field})")
        code_holder: Any = component
        if component.get("type") == "parallel":
            code_holder = component.get("task")
        if isinstance(code_holder, dict):
            code = code_holder.get("code")
            if isinstance(code, dict):
                code = code.get("local_path")
            if isinstance(code, str) and ":" not in code:
                code_holder["code"] = _absolute(folder, code, f"{field}: code")
        _inline_environment(component, "environment", folder, f"{field}.environment")
        _inline_environment(component.get("task"), "environment", folder, f"{field}.task.environment")
        holder[key] = component


def prepare(doc: dict[str, Any], base: Path) -> None:
    """Component files, ``file:`` environments and conda files read into the document."""
    _inline_components(doc, base)
    _inline_environments(doc, base)


def _ignored(folder: Path) -> pathspec.PathSpec | None:
    lines: list[str] = []
    for name in IGNORE_FILES:
        file = folder / name
        if file.is_file():
            lines.extend(file.read_text().splitlines())
    return pathspec.GitIgnoreSpec.from_lines(lines) if lines else None


def snapshot(folder: Path) -> bytes:
    """A code folder as tar.gz: ``.git`` and what .gitignore/.amlignore/.shoalignore name left out."""
    if not folder.is_dir():
        raise errors.ValidationError(f"invalid code: {folder} is not a folder")
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", compresslevel=1) as tar:
        specs: dict[Path, list[tuple[Path, pathspec.PathSpec]]] = {}
        for here, dirs, files in os.walk(folder):
            current = Path(here)
            inherited = specs.get(current, [])
            own = _ignored(current)
            active = inherited + ([(current, own)] if own else [])

            def skip(path: Path, is_dir: bool, active: list[tuple[Path, pathspec.PathSpec]] = active) -> bool:
                for root, spec in active:
                    relative = path.relative_to(root).as_posix() + ("/" if is_dir else "")
                    if spec.match_file(relative):
                        return True
                return False

            kept = []
            for name in sorted(dirs):
                path = current / name
                if name == ".git" or skip(path, True):
                    continue
                kept.append(name)
                specs[path] = active
                tar.add(path, arcname=path.relative_to(folder).as_posix(), recursive=False)
            dirs[:] = kept
            for name in sorted(files):
                path = current / name
                if skip(path, False):
                    continue
                tar.add(path, arcname=path.relative_to(folder).as_posix(), recursive=False)
    return buffer.getvalue()


def pack(folder: Path) -> bytes:
    """A data folder or build context as tar.gz, everything in it."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", compresslevel=1) as tar:
        tar.add(folder, arcname=".")
    return buffer.getvalue()


def local_part(base: Path, path: str, folder: bool, is_code: bool, field: str) -> Part:
    """One local path as a multipart part named as the coordinator reads it."""
    full = base / path
    if not full.exists():
        raise errors.ValidationError(f"invalid {field}: `{path}` does not exist (no {full})")
    if folder and full.is_dir():
        data = snapshot(full) if is_code else pack(full)
        return ("folder", (path, data, "application/gzip"))
    if not folder and full.is_file():
        return ("file", (path, full.read_bytes(), "application/octet-stream"))
    if folder:
        hint = "" if is_code else ": give `type: uri_file`"
        raise errors.ValidationError(f"invalid {field}: `{path}` is a file, not a folder{hint}")
    raise errors.ValidationError(f"invalid {field}: `{path}` is a folder, not a file: give `type: uri_folder`")


def spec_part(text: str) -> Part:
    return ("spec", (None, text.encode(), "text/plain"))


def extract(data: bytes, destination: Path) -> None:
    """A tar.gz from the coordinator, unpacked under `destination` (nothing outside it)."""
    destination.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        tar.extractall(destination, filter="data")
