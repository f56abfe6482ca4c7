"""Reaching the coordinator's HTTP API, with credentials found as the CLI finds them."""

from __future__ import annotations

import contextlib
import json
import os
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from . import errors

DEFAULT_ENDPOINT = "127.0.0.1:7070"


def config_dir() -> Path | None:
    """Where the CLI keeps credentials: $SHOAL_CONFIG_DIR, $XDG_CONFIG_HOME/shoal, ~/.config/shoal."""
    if os.environ.get("SHOAL_CONFIG_DIR"):
        return Path(os.environ["SHOAL_CONFIG_DIR"])
    if os.environ.get("XDG_CONFIG_HOME"):
        return Path(os.environ["XDG_CONFIG_HOME"]) / "shoal"
    if os.environ.get("HOME"):
        return Path(os.environ["HOME"]) / ".config" / "shoal"
    return None


def normalize(endpoint: str) -> str:
    """`127.0.0.1:7070` and `http://127.0.0.1:7070` name the same coordinator."""
    endpoint = endpoint.strip().rstrip("/")
    return endpoint if "://" in endpoint else f"http://{endpoint}"


def _saved(name: str) -> dict[str, Any]:
    folder = config_dir()
    if folder is None:
        return {}
    try:
        value = json.loads((folder / name).read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _first_saved(name: str, whole: str, endpoints: list[str]) -> Any:
    """What the CLI saved for the whole list of endpoints, else for the first of them that has one."""
    saved = _saved(name)
    for key in [whole, *endpoints]:
        if saved.get(key):
            return saved[key]
    return None


def saved_endpoint() -> str | None:
    """The endpoint `shoal login` (or `shoal up`) made the default."""
    endpoint = _saved("config.json").get("endpoint")
    return str(endpoint) if endpoint else None


class Connection:
    """One coordinator: its endpoint, token and CA, and an HTTP client for them.

    Each is found as the CLI finds it: the argument, else ``SHOAL_ENDPOINT`` /
    ``SHOAL_TOKEN`` / ``SHOAL_CA_FILE``, else what ``shoal up`` or ``shoal login``
    saved for the endpoint. The endpoint may list several, comma-separated (a
    leader and its standby): calls go to the first that can be reached, and
    move on to the next when a connection cannot be made (never once a request
    was sent, so nothing is submitted twice).
    """

    def __init__(
        self,
        endpoint: str | None = None,
        token: str | None = None,
        ca_file: str | os.PathLike[str] | None = None,
        timeout: float = 60.0,
    ) -> None:
        chosen = endpoint or os.environ.get("SHOAL_ENDPOINT") or saved_endpoint() or DEFAULT_ENDPOINT
        self.endpoints = [normalize(e) for e in chosen.split(",") if e.strip()] or [normalize(DEFAULT_ENDPOINT)]
        self._at = 0
        whole = ",".join(self.endpoints)
        self.token = token or os.environ.get("SHOAL_TOKEN") or _first_saved("credentials.json", whole, self.endpoints)
        ca = ca_file or os.environ.get("SHOAL_CA_FILE") or _first_saved("ca-files.json", whole, self.endpoints)
        verify: ssl.SSLContext | bool = True
        if ca:
            verify = ssl.create_default_context(cafile=str(ca))
        headers = {"user-agent": "shoal-sdk/0.1"}
        if self.token:
            headers["authorization"] = f"Bearer {str(self.token).strip()}"
        self._clients = [
            httpx.Client(base_url=e, headers=headers, verify=verify, timeout=timeout) for e in self.endpoints
        ]

    @property
    def endpoint(self) -> str:
        """The endpoint calls go to now."""
        return self.endpoints[self._at]

    @property
    def _http(self) -> httpx.Client:
        return self._clients[self._at]

    def _next(self) -> None:
        self._at = (self._at + 1) % len(self._clients)

    def close(self) -> None:
        for client in self._clients:
            client.close()

    def request(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        content: bytes | str | None = None,
        files: list[tuple[str, tuple[str | None, bytes, str]]] | None = None,
        params: dict[str, Any] | None = None,
        timeout: float | None = None,
    ) -> httpx.Response:
        """One call; an error answer raises the `ShoalError` that fits, with the coordinator's message."""
        kwargs: dict[str, Any] = {}
        if timeout is not None:
            kwargs["timeout"] = timeout
        for tries_left in reversed(range(len(self._clients))):
            try:
                response = self._http.request(
                    method, path, json=json_body, content=content, files=files, params=params, **kwargs
                )
                break
            except httpx.ConnectError as e:
                # Not sent: the next endpoint may take it.
                if tries_left == 0:
                    raise self._unreachable(e) from e
                self._next()
            except httpx.TransportError as e:
                raise self._unreachable(e) from e
        if response.is_error:
            raise _error(response)
        return response

    def _unreachable(self, e: httpx.TransportError) -> errors.ConnectionFailed:
        if "CERTIFICATE_VERIFY_FAILED" in str(e):
            return errors.ConnectionFailed(
                f"refusing the coordinator at {self.endpoint}: its certificate is not signed by the CA "
                f"given (ca_file= / SHOAL_CA_FILE, or the one `shoal up --tls` saved): {e}"
            )
        where = ", ".join(self.endpoints)
        return errors.ConnectionFailed(
            f"cannot reach the coordinator at {where} ({e}); start one with "
            "`shoal up`, or set SHOAL_ENDPOINT / Workspace(endpoint=...)"
        )

    def json(self, method: str, path: str, **kwargs: Any) -> Any:
        return self.request(method, path, **kwargs).json()

    @contextlib.contextmanager
    def stream(self, path: str, params: dict[str, Any] | None = None) -> Iterator[httpx.Response]:
        """A streamed GET (logs that follow a job, downloads), with no read timeout."""
        for tries_left in reversed(range(len(self._clients))):
            try:
                with self._http.stream("GET", path, params=params, timeout=httpx.Timeout(30.0, read=None)) as response:
                    if response.is_error:
                        response.read()
                        raise _error(response)
                    yield response
                return
            except httpx.ConnectError as e:
                if tries_left == 0:
                    raise self._unreachable(e) from e
                self._next()
            except httpx.TransportError as e:
                raise self._unreachable(e) from e


def _error(response: httpx.Response) -> errors.ShoalError:
    try:
        body: object = response.json()
    except ValueError:
        body = None
    fallback = response.text.strip() or f"HTTP {response.status_code}"
    return errors.from_response(response.status_code, body, fallback)
