"""``python -m bench`` (``make bench``): run the bench and print the table.

Order: the groups of :mod:`bench.groups` in turn (core, gateway, dpop, instances, overhead).
The core provider (an instance in a temp dir, SQLite, 2 workers) and the baseline are started
the first time a group needs them, checked (every request must succeed on both) and warmed up;
each group starts what else it needs, checks it and warms it up, then measures: each
measurement is cut into slices of about two seconds, alternated between its setups in ABBA
order (P B B P ...), and merged (requests over time, exact percentiles of the pooled latency
histograms). Every server started here is stopped on the way out, whatever happens (their
process groups are killed); the PostgreSQL schema and the Redis database the ``instances``
group uses are dropped and flushed.

Environment: ``BENCH_SECONDS`` (each side of each measurement, default 8, three times that for
the ``overhead`` group; about 5 minutes in all), ``BENCH_WARMUP_SECONDS`` (per server, default
2), ``BENCH_ONLY`` (a comma-separated list of groups, default all; a partial run writes
``bench/results/partial.json``, not ``latest.json``), ``BENCH_POSTGRES_URL`` and
``BENCH_REDIS_URL`` (the stores of the ``instances`` group; defaults
``postgresql+psycopg://postgres@127.0.0.1:5432/test`` and ``redis://127.0.0.1:6379/15``, which
is flushed).
"""

from __future__ import annotations

import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType

from bench import groups, report, wrk
from bench.noise import combined
from bench.servers import RssSampler

REPO = Path(__file__).resolve().parent.parent


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


def _groups() -> tuple[str, ...]:
    text = os.environ.get("BENCH_ONLY", "").strip()
    if not text:
        return groups.GROUPS
    chosen = {name.strip() for name in text.split(",") if name.strip()}
    unknown = sorted(chosen - set(groups.GROUPS))
    if unknown or not chosen:
        print(f"bench: BENCH_ONLY takes a comma-separated list of {', '.join(groups.GROUPS)}, "
              f"not {text!r}", file=sys.stderr)
        sys.exit(2)
    return tuple(name for name in groups.GROUPS if name in chosen)


def _terminate(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through the finally blocks that stop the servers


def _git_revision() -> str:
    completed = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"],
                               capture_output=True, text=True, check=False)
    return completed.stdout.strip() or "unknown"


def _command() -> str:
    settings = [f"{name}={os.environ[name].strip()}" for name in ("BENCH_ONLY", "BENCH_SECONDS")
                if os.environ.get(name, "").strip()]
    return " ".join([*settings, "make bench"])


def main() -> int:
    seconds = _seconds("BENCH_SECONDS", 8.0)
    warmup = round(_seconds("BENCH_WARMUP_SECONDS", 2.0))
    chosen = _groups()
    started = time.monotonic()
    wrk_path = wrk.ensure_wrk()
    # Ctrl-C raises KeyboardInterrupt even when started from a shell that ignores SIGINT.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="token-provider-bench-") as directory, \
            RssSampler([]) as sampler:
        ctx = groups.Context(wrk_path, Path(directory), seconds, warmup, sampler)
        try:
            for name in chosen:
                groups.progress(f"bench: --- {name}")
                groups.RUNS[name](ctx)
        except RuntimeError as exc:
            print(f"bench: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("bench: interrupted; stopping the servers", file=sys.stderr)
            return 130
        finally:
            sampler.sample()
            for server in reversed(ctx.servers):
                server.stop()
        rss = {name: sampler.peaks_mib(name) for name in sampler.peaks}
    command = _command()
    run = report.Run(
        measurements=ctx.measurements, comparisons=ctx.comparisons, rss_mib=rss,
        noise=combined(list(ctx.noise.values())), seconds=seconds, warmup_seconds=warmup,
        runtime_s=time.monotonic() - started, command=command, groups=chosen,
        group_noise=ctx.noise,
        machine={"cpus": os.cpu_count(), "python": platform.python_version(),
                 "wrk": wrk.version(wrk_path), "revision": _git_revision(),
                 "loadavg_before": load_before, "loadavg_after": os.getloadavg()})
    print()
    print(report.render(run))
    path = report.write_json(run, report.RESULTS if chosen == groups.GROUPS else report.PARTIAL)
    print(f"Wrote {path.relative_to(REPO)}.  Reproduce: {command}  "
          f"(BENCH_SECONDS=<s> per run, default 8; BENCH_ONLY={','.join(groups.GROUPS)} "
          "selects groups)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
