"""The issue's targets, the report printed to stdout, and ``bench/results/latest.json``."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.noise import Noise
from bench.wrk import WrkResult

# The targets: provider throughput as a share of the same-run baseline's, p99 latency
# by connection count, and peak resident memory per gunicorn worker.
RATIO_TARGETS = {"client_credentials": 0.8, "token_exchange": 0.7, "introspection": 0.8}
P99_TARGETS_MS = {4: 5.0, 32: 15.0}
RSS_TARGET_MIB = 120.0
NOISY = 0.25  # share of the CPUs taken by other processes above which a run is called noisy
RESULTS = Path(__file__).resolve().parent / "results" / "latest.json"


@dataclass(frozen=True)
class Measurement:
    endpoint: str
    connections: int
    provider: WrkResult
    baseline: WrkResult

    @property
    def ratio(self) -> float:
        base = self.baseline.requests_per_s
        return self.provider.requests_per_s / base if base else 0.0

    @property
    def slice_ratios(self) -> list[float]:
        """Provider over baseline for each pair of slices run back to back: their spread shows
        how much the machine's noise moved the figure."""
        return [p.requests_per_s / b.requests_per_s
                for p, b in zip(self.provider.slices, self.baseline.slices, strict=True)
                if b.requests_per_s]

    @property
    def cpu_ratio(self) -> float:
        """Baseline CPU per request over the provider's: the throughput ratio the provider
        would have if both had the CPUs to themselves."""
        provider = self.provider.cpu_us_per_request
        return self.baseline.cpu_us_per_request / provider if provider else 0.0

    @property
    def ratio_target(self) -> float:
        return RATIO_TARGETS[self.endpoint]

    @property
    def p99_target_ms(self) -> float | None:
        return P99_TARGETS_MS.get(self.connections)

    @property
    def ratio_met(self) -> bool:
        return self.ratio >= self.ratio_target

    @property
    def p99_met(self) -> bool | None:
        target = self.p99_target_ms
        return None if target is None else self.provider.p99_ms <= target

    def as_dict(self) -> dict[str, Any]:
        return {"endpoint": self.endpoint, "connections": self.connections,
                "provider": self.provider.as_dict(), "baseline": self.baseline.as_dict(),
                "ratio": round(self.ratio, 3),
                "slice_ratios": [round(r, 3) for r in self.slice_ratios],
                "cpu_ratio": round(self.cpu_ratio, 3),
                "ratio_target": self.ratio_target,
                "ratio_met": self.ratio_met, "p99_target_ms": self.p99_target_ms,
                "p99_met": self.p99_met}


def _verdict(met: bool | None) -> str:
    return "-" if met is None else ("met" if met else "NOT MET")


def _spread(ratios: list[float]) -> str:
    return f"{min(ratios):.2f}-{max(ratios):.2f}" if len(ratios) > 1 else "-"


def table(measurements: list[Measurement]) -> str:
    columns = [("endpoint", "", 18, "<"), ("conns", "", 5, ">"),
               ("provider", "req/s", 8, ">"), ("baseline", "req/s", 8, ">"),
               ("ratio", "", 5, ">"), ("slices", "min-max", 9, ">"), ("target", "", 6, ">"),
               ("", "", 7, "<"), ("p50", "ms", 6, ">"), ("p99", "ms", 6, ">"),
               ("target", "ms", 6, ">"), ("", "", 7, "<"), ("base p50/p99", "ms", 12, ">")]

    def row(values: list[str]) -> str:
        return " ".join(f"{v:{align}{width}}" for v, (_, _, width, align) in zip(
            values, columns, strict=True)).rstrip()

    lines = [row([c[0] for c in columns]), row([c[1] for c in columns])]
    lines.append("-" * len(lines[0]))
    for m in measurements:
        p, b = m.provider, m.baseline
        lines.append(row([
            m.endpoint, str(m.connections), f"{p.requests_per_s:.1f}", f"{b.requests_per_s:.1f}",
            f"{m.ratio:.2f}", _spread(m.slice_ratios), f">={m.ratio_target:.2f}",
            _verdict(m.ratio_met), f"{p.p50_ms:.2f}", f"{p.p99_ms:.2f}",
            f"<={m.p99_target_ms:g}" if m.p99_target_ms is not None else "-",
            _verdict(m.p99_met), f"{b.p50_ms:.2f}/{b.p99_ms:.2f}",
        ]))
    return "\n".join(lines)


def cpu_table(measurements: list[Measurement]) -> str:
    lines = [f"{'endpoint':<18} {'conns':>5} {'provider':>9} {'baseline':>9} {'ratio':>6} "
             f"{'target':>7}",
             f"{'':<18} {'':>5} {'us/req':>9} {'us/req':>9} {'':>6} {'':>7}"]
    lines.append("-" * len(lines[0]))
    for m in measurements:
        lines.append(f"{m.endpoint:<18} {m.connections:>5} "
                     f"{m.provider.cpu_us_per_request:>9.0f} {m.baseline.cpu_us_per_request:>9.0f} "
                     f"{m.cpu_ratio:>6.2f} {'>=' + format(m.ratio_target, '.2f'):>7}")
    return "\n".join(lines)


def rss_lines(peaks: dict[str, dict[int, float]]) -> list[str]:
    lines = [f"Peak RSS per gunicorn worker (VmHWM), target < {RSS_TARGET_MIB:g} MiB:"]
    for name, workers in peaks.items():
        figures = ", ".join(f"pid {pid}: {mib:.1f} MiB" for pid, mib in workers.items())
        worst = max(workers.values(), default=0.0)
        verdict = _verdict(worst < RSS_TARGET_MIB) if name == "provider" else "(reference)"
        lines.append(f"  {name:<9} max {worst:6.1f} MiB  {verdict:<11} [{figures or 'no worker seen'}]")
    return lines


def problems(measurements: list[Measurement]) -> list[str]:
    """Runs whose figures include refused or failed requests (the ratio would mislead)."""
    found = []
    for m in measurements:
        for name, result in (("provider", m.provider), ("baseline", m.baseline)):
            if result.status_errors or result.socket_errors:
                found.append(f"WARNING: {name} {m.endpoint} c{m.connections}: "
                             f"{result.status_errors} non-2xx answers, "
                             f"{result.socket_errors} socket errors/timeouts "
                             f"out of {result.requests} requests")
    return found


@dataclass(frozen=True)
class Run:
    """Everything one ``make bench`` measured, and how."""

    measurements: list[Measurement]
    rss_mib: dict[str, dict[int, float]]  # server name -> worker pid -> peak MiB
    noise: Noise
    seconds: float
    warmup_seconds: int
    runtime_s: float
    command: str
    machine: dict[str, Any] = field(default_factory=dict)

    @property
    def provider_rss_mib(self) -> float:
        return max(self.rss_mib.get("provider", {}).values(), default=0.0)

    @property
    def rss_met(self) -> bool:
        return self.provider_rss_mib < RSS_TARGET_MIB

    @property
    def verdicts(self) -> list[bool]:
        found: list[bool] = [m.ratio_met for m in self.measurements]
        found += [m.p99_met for m in self.measurements if m.p99_met is not None]
        found.append(self.rss_met)
        return found


def render(run: Run) -> str:
    """The report printed to stdout."""
    cpus = run.machine.get("cpus")
    lines = [
        f"token-provider bench: {run.seconds:g} s per run, wrk -t2, gunicorn sync x2 --preload, "
        f"{cpus} CPUs, load average {run.machine.get('loadavg_before', [0.0])[0]:.2f} before",
        "ratio = provider req/s / baseline req/s, both measured in this run (the baseline is a "
        "trivial Flask app",
        "doing only the inherent HMAC + ES256 work); slices = that ratio in each back-to-back "
        "pair of runs;",
        "p50/p99 are the provider's.",
        "",
        table(run.measurements),
        "",
        "Server CPU time (master + workers, user + system) per request; ratio = baseline/provider,",
        "the throughput ratio without the other load on the machine (for reading, not judged):",
        cpu_table(run.measurements),
        "",
        *rss_lines(run.rss_mib),
        *problems(run.measurements),
        "",
        f"Noise: other processes kept {run.noise.other_share:.0%} of the {cpus} CPUs busy during "
        f"the timed runs (hypervisor steal {run.noise.steal_share:.0%}); the more, the less the "
        "absolute figures mean.",
    ]
    if run.noise.other_share > NOISY:
        lines += ["The machine was busy: trust the ratios (and the CPU table) over the absolute "
                  "figures; a longer run", "(BENCH_SECONDS=20 make bench) narrows the slice spread."]
    verdicts = run.verdicts
    lines.append(f"Targets met: {sum(verdicts)}/{len(verdicts)}.  Runtime {run.runtime_s:.0f} s.")
    return "\n".join(lines)


def document(run: Run) -> dict[str, Any]:
    """What ``bench/results/latest.json`` holds."""
    verdicts = run.verdicts
    return {
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": run.command,
        "seconds": run.seconds,
        "warmup_seconds": run.warmup_seconds,
        "runtime_s": round(run.runtime_s, 1),
        "machine": {**run.machine, "other_cpu_share": round(run.noise.other_share, 3),
                    "steal_cpu_share": round(run.noise.steal_share, 3)},
        "targets": {"ratio": RATIO_TARGETS, "p99_ms": P99_TARGETS_MS, "rss_mib": RSS_TARGET_MIB},
        "results": [m.as_dict() for m in run.measurements],
        "rss_mib": {name: {str(pid): round(mib, 1) for pid, mib in workers.items()}
                    for name, workers in run.rss_mib.items()},
        "rss_met": run.rss_met,
        "targets_met": sum(verdicts),
        "targets_checked": len(verdicts),
    }


def write_json(run: Run, path: Path = RESULTS) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document(run), indent=2) + "\n", encoding="utf-8")
    return path
