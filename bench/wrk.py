"""The load generator: wrk (Debian's package), driven by Lua scripts written to a temp dir.

Each script sends one fixed request (or, for the warm-up, a round-robin of several): a POST form
body with its ``Authorization: Basic`` header, or a GET with a ``Bearer`` token (the gateway).
Its ``done()`` callback prints one JSON line with the exact figures wrk aggregated over its
threads (microseconds), so nothing is parsed from wrk's human-readable output.

Lua cannot sign ES256, so a request that needs a fresh DPoP proof each time takes it from a file
of proofs generated beforehand (:mod:`bench.dpop`): each wrk thread uses its own share of the
lines, each line at most once, and ``done()`` reports how many were used and whether any thread
ran out (it then stops, and the run is reported as invalid rather than replaying proofs).
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
    '"p50_us":%d,"p99_us":%d,"histogram":[%s]',
    "RESULT_MARKER", summary.requests, summary.duration,
    e.connect + e.read + e.write + e.timeout, e.status,
    latency:percentile(50), latency:percentile(99), table.concat(buckets, ","))
    .. proofs_report() .. "}\\n")
end
""".replace("RESULT_MARKER", RESULT_MARKER)


# Every thread's Lua state: its index among the threads (set by ``setup``, which runs in the main
# state, before the thread's ``init``), and with a proof file, its share of the proofs.
_THREADS = """
local threads = {}
setup = function(thread)
  thread:set("thread_index", #threads)
  threads[#threads + 1] = thread
end

proofs_used, proofs_ran_out = 0, 0
local proofs, next_proof, proof_step = nil, 0, 1
init = function(args)
  -- args: the number of threads (always, see Load), then the proof file if any.
  if args[2] then
    proofs = {}
    for line in io.lines(args[2]) do proofs[#proofs + 1] = line end
    next_proof, proof_step = thread_index + 1, tonumber(args[1])
  end
end

-- A proof never used before (each jti is single use); out of them, the thread stops.
local next_dpop = function()
  local proof = proofs[next_proof]
  if proof == nil then
    proofs_ran_out = 1
    wrk.thread:stop()
    return "ran-out"
  end
  next_proof = next_proof + proof_step
  proofs_used = proofs_used + 1
  return proof
end

proofs_report = function()
  local used, ran_out = 0, 0
  for _, thread in ipairs(threads) do
    used = used + (thread:get("proofs_used") or 0)
    ran_out = math.max(ran_out, thread:get("proofs_ran_out") or 0)
  end
  return string.format(',"proofs_used":%d,"proofs_ran_out":%d', used, ran_out)
end
"""


@dataclass(frozen=True)
class Request:
    """One HTTP request wrk repeats: by default ``POST path`` with a form body and Basic
    credentials; ``method="GET"`` with an empty body sends no body (the gateway). With
    ``dpop``, each request carries a fresh proof from the file its :class:`Load` names."""

    path: str
    body: str
    authorization: str
    method: str = "POST"
    dpop: bool = False


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
    proofs_used: int = 0
    proofs_ran_out: bool = False

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.duration_s if self.duration_s > 0 else 0.0


def concurrent(slices: list[Slice]) -> Slice:
    """Several wrk runs made at the same time against several servers, as one: requests and
    histograms added, and a duration such that requests/s is the sum of theirs."""
    rate = sum(s.requests_per_s for s in slices)
    requests = sum(s.requests for s in slices)
    histogram: dict[int, int] = {}
    for piece in slices:
        for value, count in piece.histogram.items():
            histogram[value] = histogram.get(value, 0) + count
    return Slice(requests=requests, duration_s=requests / rate if rate else 0.0,
                 socket_errors=sum(s.socket_errors for s in slices),
                 status_errors=sum(s.status_errors for s in slices), histogram=histogram,
                 cpu_s=sum(s.cpu_s for s in slices), proofs_used=sum(s.proofs_used for s in slices),
                 proofs_ran_out=any(s.proofs_ran_out for s in slices))


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

    @property
    def proofs_used(self) -> int:
        return sum(s.proofs_used for s in self.slices)

    @property
    def proofs_ran_out(self) -> bool:
        return any(s.proofs_ran_out for s in self.slices)

    def as_dict(self) -> dict[str, object]:
        document: dict[str, object] = {
            "requests": self.requests, "duration_s": round(self.duration_s, 3),
            "requests_per_s": round(self.requests_per_s, 1),
            "p50_ms": round(self.p50_ms, 3), "p99_ms": round(self.p99_ms, 3),
            "max_ms": round(self.max_ms, 3),
            "cpu_us_per_request": round(self.cpu_us_per_request, 1),
            "slices_requests_per_s": [round(s.requests_per_s, 1) for s in self.slices],
            "socket_errors": self.socket_errors, "status_errors": self.status_errors}
        if self.proofs_used or self.proofs_ran_out:
            document.update(proofs_used=self.proofs_used, proofs_ran_out=self.proofs_ran_out)
        return document


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
    body = _lua_string(request.body) if request.body else "nil"
    content_type = '"application/x-www-form-urlencoded"' if request.body else "nil"
    return (f"{{method = {_lua_string(request.method)}, path = {_lua_string(request.path)}, "
            f"body = {body}, content_type = {content_type}, "
            f"authorization = {_lua_string(request.authorization)}, "
            f"dpop = {'true' if request.dpop else 'false'}}}")


def write_script(directory: Path, name: str, requests: list[Request]) -> Path:
    """A script that sends ``requests`` in turn (one request: always that one)."""
    table = ",\n  ".join(_request_table(r) for r in requests)
    script = f"""-- generated by bench/wrk.py
{_THREADS}
local requests = {{
  {table}
}}
local i = 0
request = function()
  i = i % #requests + 1
  local r = requests[i]
  local headers = {{["Authorization"] = r.authorization, ["Content-Type"] = r.content_type}}
  if r.dpop then headers["DPoP"] = next_dpop() end
  return wrk.format(r.method, r.path, headers, r.body)
end
{_DONE}"""
    path = directory / f"{name}.lua"
    path.write_text(script, encoding="ascii")
    return path


@dataclass(frozen=True)
class Load:
    """One wrk run to make: ``script`` against 127.0.0.1:``port``, with ``proofs`` (a file of
    DPoP proofs, one a line) when the script's request needs them."""

    script: Path
    port: int
    connections: int
    threads: int = 2
    proofs: Path | None = None

    def command(self, wrk: str, seconds: int) -> list[str]:
        threads = min(self.threads, self.connections)
        args = [str(threads)] + ([str(self.proofs)] if self.proofs else [])
        return [wrk, f"-t{threads}", f"-c{self.connections}", f"-d{seconds}s", "--timeout", "5s",
                "-s", str(self.script), f"http://127.0.0.1:{self.port}/", *args]


def run_together(wrk: str, loads: list[Load], seconds: int) -> list[Slice]:
    """Start one wrk per load at the same time (one load: a plain run), wait for all, and
    return what each counted."""
    processes = [subprocess.Popen(load.command(wrk, seconds), stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for load in loads]
    outputs = []
    try:
        for process in processes:
            stdout, stderr = process.communicate(timeout=seconds + 60)
            outputs.append((process.returncode, stdout, stderr))
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    return [_parse(*output) for output in outputs]


def _parse(returncode: int, stdout: str, stderr: str) -> Slice:
    for line in stdout.splitlines():
        if line.startswith(RESULT_MARKER):
            data = json.loads(line[len(RESULT_MARKER):])
            break
    else:
        raise RuntimeError(f"wrk printed no result (exit {returncode}):\n{stdout}\n{stderr}")
    return Slice(requests=data["requests"], duration_s=data["duration_us"] / 1e6,
                 socket_errors=data["socket_errors"], status_errors=data["status_errors"],
                 histogram={value: count for value, count in data["histogram"]},
                 proofs_used=data["proofs_used"], proofs_ran_out=bool(data["proofs_ran_out"]))
