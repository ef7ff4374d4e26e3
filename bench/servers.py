"""Server processes: started in their own process group, stopped whole, sampled for memory.

The provider and the baseline run under gunicorn with the provider's production settings:
sync workers (``provider.serving.SyncWorker``, which ``serve`` runs), two of them (one for the
single-worker instances), the application loaded in the master before forking; the gateway's
upstream runs under gunicorn too. The master is the process started here; its children are the
workers whose peak RSS is reported.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from contextlib import suppress
from pathlib import Path
from typing import IO

_STOP_SECONDS = 10.0


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the kernel's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Server:
    """A server process in a new session (so its own process group), logging to a file.

    gunicorn's control socket defaults to ``$HOME/.gunicorn/gunicorn.ctl``, shared by every
    gunicorn of the user: a newer master takes it over, and a control command meant for another
    server (a test's, a developer's) would reach ours. Each server here gets its own
    ``XDG_RUNTIME_DIR``, hence its own socket, and leaves the others' alone.
    """

    def __init__(self, name: str, command: Sequence[str], port: int, env: dict[str, str],
                 cwd: Path, log_path: Path, workers: int = 2):
        self.name = name
        self.workers = workers
        self.command = list(command)
        self.port = port
        self.runtime_dir = log_path.parent / f"{name}-run"
        self.env = {**env, "XDG_RUNTIME_DIR": str(self.runtime_dir)}
        self.cwd = cwd
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def pid(self) -> int:
        if self.process is None:
            raise RuntimeError(f"{self.name} is not started")
        return self.process.pid

    def start(self, ready_path: str = "/healthz", timeout: float = 60.0) -> None:
        """Start, and return once ``ready_path`` answers 200 and every worker is forked."""
        self.runtime_dir.mkdir(mode=0o700, exist_ok=True)
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(self.command, cwd=self.cwd, env=self.env,
                                        stdin=subprocess.DEVNULL, stdout=self._log,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        url = f"http://127.0.0.1:{self.port}{ready_path}"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with status {self.process.returncode}:\n"
                                   f"{self.log_tail()}")
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200 and len(self.worker_pids()) >= self.workers:
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} was not ready within {timeout:.0f} s:\n{self.log_tail()}")

    def ensure_running(self) -> None:
        """Raise, with the end of its log, if the server has exited."""
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(f"{self.name} exited with status {self.process.returncode} "
                               f"during the bench:\n{self.log_tail()}")

    def worker_pids(self) -> list[int]:
        return children(self.pid)

    def cpu_seconds(self) -> float:
        """User + system CPU time of the master and its live workers so far."""
        return sum(cpu_seconds(pid) for pid in (self.pid, *self.worker_pids()))

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        """SIGTERM to the whole process group (gunicorn's graceful stop), SIGKILL if it lingers."""
        process = self.process
        if process is None:
            return
        try:
            if process.poll() is None:
                _signal_group(process.pid, signal.SIGTERM)
                with suppress(subprocess.TimeoutExpired):
                    process.wait(_STOP_SECONDS)
            # Workers may outlive a master that died abnormally: the group goes, whatever is left.
            _signal_group(process.pid, signal.SIGKILL)
            process.wait(_STOP_SECONDS)
        finally:
            if self._log is not None:
                self._log.close()
            self.process = None


def _signal_group(pgid: int, signum: int) -> None:
    with suppress(ProcessLookupError):
        os.killpg(pgid, signum)


def children(pid: int) -> list[int]:
    """The direct children of ``pid`` (from /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # Fields after the command name, which is in parentheses and may hold spaces.
        fields = stat[stat.rfind(")") + 2:].split()
        if len(fields) > 1 and int(fields[1]) == pid:
            found.append(int(entry))
    return sorted(found)


_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` (0 when it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat[stat.rfind(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


def memory_kib(pid: int) -> tuple[int, int] | None:
    """(VmHWM, VmRSS) of ``pid`` in KiB, or None when it is gone."""
    values: dict[str, int] = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                values[key] = int(rest.split()[0])
    except (OSError, ValueError, IndexError):
        return None
    if len(values) != 2:
        return None
    return values["VmHWM"], values["VmRSS"]


class RssSampler:
    """Samples the peak RSS (VmHWM, and VmRSS) of every worker of some servers, in a thread.

    Keeps the largest figure seen per worker pid, so a worker replaced mid-run is still counted.
    """

    def __init__(self, servers: Sequence[Server], interval: float = 0.5):
        self.servers = list(servers)
        self.interval = interval
        self.peaks: dict[str, dict[int, int]] = {s.name: {} for s in self.servers}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)
        self._lock = threading.Lock()

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def add(self, server: Server) -> None:
        """Sample ``server`` too from now on."""
        with self._lock:
            self.servers.append(server)
            self.peaks.setdefault(server.name, {})

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def sample(self) -> None:
        with self._lock:
            servers = list(self.servers)
        for server in servers:
            if server.process is None:
                continue
            for pid in server.worker_pids():
                memory = memory_kib(pid)
                if memory is None:
                    continue
                with self._lock:
                    peaks = self.peaks[server.name]
                    peaks[pid] = max(peaks.get(pid, 0), *memory)

    def peaks_mib(self, name: str) -> dict[int, float]:
        with self._lock:
            return {pid: kib / 1024 for pid, kib in sorted(self.peaks[name].items())}


def get(port: int, path: str, authorization: str) -> tuple[int, bytes]:
    """One GET to 127.0.0.1; the status and the body."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}",
                                     headers={"Authorization": authorization})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def post_form(port: int, path: str, body: str, authorization: str,
              headers: dict[str, str] | None = None) -> tuple[int, dict]:
    """One POST to 127.0.0.1 with a form body; the status and the decoded JSON answer."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", data=body.encode("ascii"), method="POST",
        headers={"Content-Type": "application/x-www-form-urlencoded",
                 "Authorization": authorization, **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        try:
            return error.code, json.loads(error.read())
        except ValueError:
            return error.code, {}
