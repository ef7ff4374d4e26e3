"""``python -m bench`` (``make bench``): run the bench and print the table.

Order: set up a provider instance in a temp dir and start it, take its tokens, start the
baseline, check that every request succeeds on both, warm both up, then for each endpoint run
provider c4, baseline c4, provider c32, baseline c32; each of those is cut into slices of about
two seconds, alternated provider/baseline in ABBA order (P B B P ...), and merged (requests over
time, exact percentiles of the pooled latency histograms). Every server started here is stopped on
the way out, whatever happens (their process groups are killed).

Environment: ``BENCH_SECONDS`` (each timed run, default 8), ``BENCH_WARMUP_SECONDS`` (per server,
default 2).
"""

from __future__ import annotations

import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from types import FrameType

from bench import fixtures, report, wrk
from bench.noise import CpuMeter, Noise
from bench.servers import RssSampler, Server, free_port

REPO = Path(__file__).resolve().parent.parent
CONNECTIONS = (4, 32)
WORKERS = 2  # the provider's production default (``serve --workers``)
WARMUP_CONNECTIONS = 8
# Each measurement is cut into runs of about this many seconds, alternating provider and
# baseline, so that a burst of load from elsewhere on the machine hits both alike.
SLICE_SECONDS = 2


def _seconds(variable: str, default: float) -> float:
    text = os.environ.get(variable, "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 1 <= value <= 600:
        print(f"bench: {variable} must be a number of seconds between 1 and 600, not {text!r}",
              file=sys.stderr)
        sys.exit(2)
    return value


def _slices(seconds: float) -> tuple[int, int]:
    """How many wrk runs of how many whole seconds make up one measurement of ``seconds``."""
    count = max(1, round(seconds / SLICE_SECONDS))
    return count, max(1, round(seconds / count))


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _terminate(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through the finally blocks that stop the servers


def _baseline_server(port: int, config: Path, log: Path) -> Server:
    env = {**os.environ, "BENCH_BASELINE_CONFIG": str(config), "PYTHONPATH": str(REPO)}
    command = [str(fixtures.venv_bin() / "gunicorn"), "-w", str(WORKERS), "-k", "sync", "--preload",
               "-b", f"127.0.0.1:{port}", "--timeout", "60", "--graceful-timeout", "10",
               "bench.baseline_app:app"]
    return Server("baseline", command, port, env, REPO, log, workers=WORKERS)


def _git_revision() -> str:
    completed = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"],
                               capture_output=True, text=True, check=False)
    return completed.stdout.strip() or "unknown"


@dataclass(frozen=True)
class Outcome:
    measurements: list[report.Measurement]
    rss_mib: dict[str, dict[int, float]]
    noise: Noise


def measure(wrk_path: str, work: Path, seconds: float, warmup: int,
            servers: list[Server]) -> Outcome:
    """Start both servers (appending them to ``servers`` so the caller stops them) and measure."""
    instance = fixtures.ProviderInstance(work / "provider", free_port())
    instance.directory.mkdir()
    _progress("bench: token-provider init, clients create ...")
    instance.initialize()
    provider = Server("provider", instance.serve_command(workers=WORKERS), instance.port,
                      instance.env, instance.directory, work / "provider.log", workers=WORKERS)
    servers.append(provider)
    provider.start()
    workload = fixtures.build_workload(instance)
    config = fixtures.baseline_config(instance, work / "baseline.json")
    baseline = _baseline_server(free_port(), config, work / "baseline.log")
    servers.append(baseline)
    baseline.start()
    for server in (provider, baseline):
        fixtures.check_workload(server.port, workload, server.name)
    _progress(f"bench: provider on :{provider.port} (workers {provider.worker_pids()}), "
              f"baseline on :{baseline.port} (workers {baseline.worker_pids()})")

    scripts = {name: wrk.write_script(work, name, [request])
               for name, request in workload.requests.items()}
    mixed = wrk.write_script(work, "warmup", list(workload.requests.values()))
    with RssSampler([provider, baseline]) as sampler:
        for server in (provider, baseline):
            _progress(f"bench: warm-up {server.name} {warmup} s")
            wrk.run(wrk_path, mixed, server.port, WARMUP_CONNECTIONS, warmup)
        meter = CpuMeter(lambda: provider.cpu_seconds() + baseline.cpu_seconds())
        with meter:
            measurements = _measure_all(wrk_path, scripts, provider, baseline, seconds)
    peaks = {server.name: sampler.peaks_mib(server.name) for server in (provider, baseline)}
    return Outcome(measurements, peaks, meter.noise)


def _timed(wrk_path: str, script: Path, server: Server, connections: int,
           seconds: int) -> wrk.Slice:
    """One wrk run, with the CPU time the server spent meanwhile."""
    before = server.cpu_seconds()
    try:
        result = wrk.run(wrk_path, script, server.port, connections, seconds)
    except RuntimeError:
        server.ensure_running()  # a dead server explains itself better than wrk does
        raise
    server.ensure_running()
    return replace(result, cpu_s=server.cpu_seconds() - before)


def _measure_all(wrk_path: str, scripts: dict[str, Path], provider: Server, baseline: Server,
                 seconds: float) -> list[report.Measurement]:
    count, length = _slices(seconds)
    measurements: list[report.Measurement] = []
    for endpoint in fixtures.ENDPOINTS:
        for connections in CONNECTIONS:
            slices: dict[str, list[wrk.Slice]] = {provider.name: [], baseline.name: []}
            for index in range(count):
                # ABBA order: a drift in the machine's load favours neither server.
                pair = (provider, baseline) if index % 2 == 0 else (baseline, provider)
                for server in pair:
                    slices[server.name].append(_timed(wrk_path, scripts[endpoint], server,
                                                      connections, length))
            measurement = report.Measurement(
                endpoint, connections, wrk.WrkResult(tuple(slices[provider.name])),
                wrk.WrkResult(tuple(slices[baseline.name])))
            measurements.append(measurement)
            _progress(f"bench: {endpoint:<18} c{connections:<3} provider "
                      f"{measurement.provider.requests_per_s:7.1f} req/s, baseline "
                      f"{measurement.baseline.requests_per_s:7.1f} req/s, "
                      f"ratio {measurement.ratio:.2f}")
    return measurements


def main() -> int:
    seconds = _seconds("BENCH_SECONDS", 8.0)
    warmup = round(_seconds("BENCH_WARMUP_SECONDS", 2.0))
    started = time.monotonic()
    wrk_path = wrk.ensure_wrk()
    # Ctrl-C raises KeyboardInterrupt even when started from a shell that ignores SIGINT.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)
    load_before = os.getloadavg()
    servers: list[Server] = []
    with tempfile.TemporaryDirectory(prefix="token-provider-bench-") as directory:
        try:
            outcome = measure(wrk_path, Path(directory), seconds, warmup, servers)
        except RuntimeError as exc:
            print(f"bench: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("bench: interrupted; stopping the servers", file=sys.stderr)
            return 130
        finally:
            for server in reversed(servers):
                server.stop()
    command = f"BENCH_SECONDS={seconds:g} make bench" if "BENCH_SECONDS" in os.environ \
        else "make bench"
    run = report.Run(
        measurements=outcome.measurements, rss_mib=outcome.rss_mib, noise=outcome.noise,
        seconds=seconds, warmup_seconds=warmup, runtime_s=time.monotonic() - started,
        command=command,
        machine={"cpus": os.cpu_count(), "python": platform.python_version(),
                 "wrk": wrk.version(wrk_path), "revision": _git_revision(),
                 "loadavg_before": load_before, "loadavg_after": os.getloadavg()})
    print()
    print(report.render(run))
    path = report.write_json(run)
    print(f"Wrote {path.relative_to(REPO)}.  Reproduce: {command}  "
          f"(BENCH_SECONDS=<s> per run, default 8; e.g. BENCH_SECONDS=20 make bench)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
