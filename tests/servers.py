"""Real servers for tests: ``token-provider serve`` processes for tests that cross processes,
and a webhook receiver."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from werkzeug.serving import make_server
from werkzeug.wrappers import Request, Response


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def serving(env: dict[str, str], *args: str, workers: int = 1,
            capture_stderr: bool = False) -> Iterator[Any]:
    """Start ``token-provider serve`` with ``env``; yields its base URL (and, with
    ``capture_stderr``, a function returning what it wrote to stderr once it has stopped);
    stops it afterwards. Its stderr goes to a file, never a pipe nobody drains."""
    port = free_port()
    command = [sys.executable, "-m", "provider", "serve", "--port", str(port),
               "--workers", str(workers), *args]
    log = tempfile.TemporaryFile()  # noqa: SIM115 - closed in the finally below
    process = subprocess.Popen(command, env={**os.environ, **env}, start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=log)
    url = f"http://127.0.0.1:{port}"

    def written() -> str:
        log.seek(0)
        return log.read().decode(errors="replace")

    try:
        deadline = time.monotonic() + 30
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"server exited: {written()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{url}/healthz", timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        yield (url, written) if capture_stderr else url
    finally:
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(process.pid, signal.SIGKILL)
        log.close()


@contextmanager
def redis_server(port: int | None = None) -> Iterator[tuple[str, int]]:
    """A private, throw-away redis-server on loopback (for tests that stop it)."""
    port = port or free_port()
    process = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
         "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0", port
    finally:
        process.terminate()
        process.wait(10)


SECRET_PATH = "/hooks/s3cr3t-path-token"  # a webhook URL's path is a secret of its own


class Webhook:
    """A local HTTP server recording what is POSTed to it; ``delay`` makes it slow."""

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []
        self.content_types: list[str] = []
        self.delay = 0.0
        self.status = 204
        self.release = threading.Event()
        self.server = make_server("127.0.0.1", 0, self.app, threaded=True)
        self.url = f"http://127.0.0.1:{self.server.server_port}{SECRET_PATH}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @Request.application
    def app(self, request: Request) -> Response:
        if self.delay:
            self.release.wait(self.delay)
        self.content_types.append(request.content_type or "")
        self.received.append(json.loads(request.get_data()))
        return Response(status=self.status)
