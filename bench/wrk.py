"""The load generator: wrk (Debian's package), driven by Lua scripts written to a temp dir.

Each script sends one fixed POST form body (or, for the warm-up, a round-robin of several) with
its ``Authorization: Basic`` header, and its ``done()`` callback prints one JSON line with the
exact figures wrk aggregated over its threads (microseconds), so nothing is parsed from wrk's
human-readable output.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

RESULT_MARKER = "BENCH_RESULT "

# ``latency(i)`` is the value (µs) and count of the i-th populated bucket of wrk's histogram, and
# ``#latency`` the number of populated buckets: the whole distribution, so that several runs can
# be merged exactly.
_DONE = """
done = function(summary, latency, requests)
  local e = summary.errors
  local buckets = {}
  for i = 1, #latency do
    local value, count = latency(i)
    buckets[#buckets + 1] = string.format("[%d,%d]", value, count)
  end
  io.write(string.format(
    '%s{"requests":%d,"duration_us":%d,"socket_errors":%d,"status_errors":%d,' ..
    '"p50_us":%d,"p99_us":%d,"histogram":[%s]}\\n',
    "RESULT_MARKER", summary.requests, summary.duration,
    e.connect + e.read + e.write + e.timeout, e.status,
    latency:percentile(50), latency:percentile(99), table.concat(buckets, ",")))
end
""".replace("RESULT_MARKER", RESULT_MARKER)


@dataclass(frozen=True)
class Request:
    """One HTTP request wrk repeats: ``POST path`` with a form body and Basic credentials."""

    path: str
    body: str
    authorization: str


@dataclass(frozen=True)
class Slice:
    """What one wrk run counted: requests, errors and the latency histogram (µs -> count);
    ``cpu_s``, the CPU time the server spent meanwhile, is filled in by the caller."""

    requests: int
    duration_s: float
    socket_errors: int
    status_errors: int
    histogram: dict[int, int]
    cpu_s: float = 0.0

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.duration_s if self.duration_s > 0 else 0.0


def percentile(histogram: dict[int, int], p: float) -> float:
    """The value (µs) at percentile ``p``, the way wrk's ``latency:percentile`` computes it."""
    total = sum(histogram.values())
    if not total:
        return 0.0
    rank = round(p / 100 * total + 0.5)
    seen = 0
    for value in sorted(histogram):
        seen += histogram[value]
        if seen >= rank:
            return float(value)
    return float(max(histogram))


@dataclass(frozen=True)
class WrkResult:
    """Several slices of one measurement, merged: total requests over total time, exact
    percentiles of the pooled latencies."""

    slices: tuple[Slice, ...]

    @property
    def requests(self) -> int:
        return sum(s.requests for s in self.slices)

    @property
    def duration_s(self) -> float:
        return sum(s.duration_s for s in self.slices)

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def histogram(self) -> dict[int, int]:
        merged: dict[int, int] = {}
        for piece in self.slices:
            for value, count in piece.histogram.items():
                merged[value] = merged.get(value, 0) + count
        return merged

    def percentile_ms(self, p: float) -> float:
        return percentile(self.histogram, p) / 1000

    @property
    def p50_ms(self) -> float:
        return self.percentile_ms(50)

    @property
    def p99_ms(self) -> float:
        return self.percentile_ms(99)

    @property
    def max_ms(self) -> float:
        return max(self.histogram, default=0) / 1000

    @property
    def cpu_us_per_request(self) -> float:
        """Server CPU time (master and workers, user + system) per request: less moved by
        other load on the machine than throughput is."""
        requests = self.requests
        return sum(s.cpu_s for s in self.slices) / requests * 1e6 if requests else 0.0

    @property
    def socket_errors(self) -> int:
        return sum(s.socket_errors for s in self.slices)

    @property
    def status_errors(self) -> int:
        return sum(s.status_errors for s in self.slices)

    def as_dict(self) -> dict[str, object]:
        return {"requests": self.requests, "duration_s": round(self.duration_s, 3),
                "requests_per_s": round(self.requests_per_s, 1),
                "p50_ms": round(self.p50_ms, 3), "p99_ms": round(self.p99_ms, 3),
                "max_ms": round(self.max_ms, 3),
                "cpu_us_per_request": round(self.cpu_us_per_request, 1),
                "slices_requests_per_s": [round(s.requests_per_s, 1) for s in self.slices],
                "socket_errors": self.socket_errors, "status_errors": self.status_errors}


def ensure_wrk() -> str:
    """wrk's path, installing Debian's package when missing (as root); else exit 1."""
    found = shutil.which("wrk")
    if found:
        return found
    if os.geteuid() != 0:
        print("bench: wrk is not installed and this is not root, so it cannot be installed here.\n"
              "       Install it with: sudo apt-get install wrk   (Debian's package), then rerun.",
              file=sys.stderr)
        sys.exit(1)
    print("bench: installing wrk (apt-get install wrk) ...", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "wrk"]):
        if subprocess.run(command, env=env, check=False).returncode != 0:
            print(f"bench: `{' '.join(command)}` failed; install wrk by hand and rerun.",
                  file=sys.stderr)
            sys.exit(1)
    found = shutil.which("wrk")
    if not found:
        print("bench: wrk is still not on PATH after installing it.", file=sys.stderr)
        sys.exit(1)
    return found


def version(wrk: str) -> str:
    completed = subprocess.run([wrk, "-v"], capture_output=True, text=True, check=False)
    text = (completed.stdout + completed.stderr).strip().splitlines()
    return text[0] if text else "unknown"


def _lua_string(value: str) -> str:
    """A Lua string literal; our bodies and headers are printable ASCII by construction."""
    if not all(0x20 <= ord(c) < 0x7f for c in value):
        raise ValueError("wrk scripts carry printable ASCII only")
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _request_table(request: Request) -> str:
    return (f"{{path = {_lua_string(request.path)}, body = {_lua_string(request.body)}, "
            f"authorization = {_lua_string(request.authorization)}}}")


def write_script(directory: Path, name: str, requests: list[Request]) -> Path:
    """A script that sends ``requests`` in turn (one request: always that one)."""
    table = ",\n  ".join(_request_table(r) for r in requests)
    script = f"""-- generated by bench/wrk.py
local requests = {{
  {table}
}}
local i = 0
request = function()
  i = i % #requests + 1
  local r = requests[i]
  return wrk.format("POST", r.path, {{
    ["Content-Type"] = "application/x-www-form-urlencoded",
    ["Authorization"] = r.authorization,
  }}, r.body)
end
{_DONE}"""
    path = directory / f"{name}.lua"
    path.write_text(script, encoding="ascii")
    return path


def run(wrk: str, script: Path, port: int, connections: int, seconds: int,
        threads: int = 2) -> Slice:
    """Run wrk once against 127.0.0.1:``port`` and return what it counted."""
    command = [wrk, f"-t{min(threads, connections)}", f"-c{connections}", f"-d{seconds}s",
               "--timeout", "5s", "-s", str(script), f"http://127.0.0.1:{port}/"]
    completed = subprocess.run(command, capture_output=True, text=True, check=False,
                               timeout=seconds + 60)
    for line in completed.stdout.splitlines():
        if line.startswith(RESULT_MARKER):
            data = json.loads(line[len(RESULT_MARKER):])
            break
    else:
        raise RuntimeError(f"wrk printed no result (exit {completed.returncode}):\n"
                           f"{completed.stdout}\n{completed.stderr}")
    return Slice(requests=data["requests"], duration_s=data["duration_us"] / 1e6,
                 socket_errors=data["socket_errors"], status_errors=data["status_errors"],
                 histogram={value: count for value, count in data["histogram"]})
