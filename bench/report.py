"""The issue's targets, the report printed to stdout, and ``bench/results/latest.json``.

Two kinds of rows, printed in one table: a :class:`Measurement` (core group: the provider
against the trivial baseline app, per endpoint and connection count) and a :class:`Comparison`
(the other groups: one setup against another, e.g. the DPoP exchange against the plain one).
Both are ratios of throughputs measured in the same run, in interleaved slices.
"""

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
# The other groups' targets (minimum ratios), by Comparison.key.
COMPARISON_TARGETS = {
    "gateway": 0.5,  # /gateway/{upstream}/{path} against a direct call from a trivial handler
    "instances_scale_out": 0.9,  # two 1-worker instances against one 2-worker one (PG+Redis)
    "instances_stores": 0.8,  # PostgreSQL + Redis against SQLite (one instance, 2 workers)
    "overhead": 0.85,  # audit + rate limits on against off: a cost under 15%
}
NOISY = 0.25  # share of the CPUs taken by other processes above which a run is called noisy
RESULTS = Path(__file__).resolve().parent / "results" / "latest.json"
PARTIAL = RESULTS.with_name("partial.json")  # a run of some groups only (BENCH_ONLY)
REFERENCE_SERVERS = ("baseline", "upstream")  # RSS shown for reading, not judged


def _ratio(measured: WrkResult, reference: WrkResult) -> float:
    base = reference.requests_per_s
    return measured.requests_per_s / base if base else 0.0


def _slice_ratios(measured: WrkResult, reference: WrkResult) -> list[float]:
    """Measured over reference for each pair of slices run back to back: their spread shows
    how much the machine's noise moved the figure."""
    return [m.requests_per_s / r.requests_per_s
            for m, r in zip(measured.slices, reference.slices, strict=True) if r.requests_per_s]


def _cpu_ratio(measured: WrkResult, reference: WrkResult) -> float:
    """Reference CPU per request over the measured one's: the throughput ratio there would be
    if both had the CPUs to themselves."""
    cpu = measured.cpu_us_per_request
    return reference.cpu_us_per_request / cpu if cpu else 0.0


@dataclass(frozen=True)
class Measurement:
    endpoint: str
    connections: int
    provider: WrkResult
    baseline: WrkResult

    @property
    def label(self) -> str:
        return self.endpoint

    @property
    def measured(self) -> WrkResult:
        return self.provider

    @property
    def reference(self) -> WrkResult:
        return self.baseline

    @property
    def ratio(self) -> float:
        return _ratio(self.provider, self.baseline)

    @property
    def slice_ratios(self) -> list[float]:
        return _slice_ratios(self.provider, self.baseline)

    @property
    def cpu_ratio(self) -> float:
        return _cpu_ratio(self.provider, self.baseline)

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


@dataclass(frozen=True)
class Comparison:
    """One setup (``measured``) against another (``reference``), measured in this run in
    interleaved slices; ``key`` names the target in :data:`COMPARISON_TARGETS`, if any.
    ``as_cost`` reports 1 - ratio, the share of throughput the measured setup costs."""

    group: str
    key: str
    label: str
    connections: int
    measured: WrkResult
    reference: WrkResult
    legend: str
    as_cost: bool = False
    notes: tuple[str, ...] = ()
    figures: dict[str, Any] = field(default_factory=dict)  # more numbers, for the JSON

    @property
    def ratio(self) -> float:
        return _ratio(self.measured, self.reference)

    @property
    def slice_ratios(self) -> list[float]:
        return _slice_ratios(self.measured, self.reference)

    @property
    def cpu_ratio(self) -> float:
        return _cpu_ratio(self.measured, self.reference)

    @property
    def ratio_target(self) -> float | None:
        return COMPARISON_TARGETS.get(self.key)

    @property
    def ratio_met(self) -> bool | None:
        target = self.ratio_target
        return None if target is None else self.ratio >= target

    p99_target_ms = None
    p99_met = None

    @property
    def cost(self) -> float:
        return 1 - self.ratio

    def describe(self) -> str:
        """The legend line under the table: what was compared, and the notes."""
        text = f"{self.label} c{self.connections}: {self.legend}"
        if self.as_cost:
            target = self.ratio_target
            text += f"; cost {self.cost:.1%}" + \
                (f" (target < {1 - target:.0%}: {_verdict(self.ratio_met)})" if target else "")
        return "; ".join([text, *self.notes])

    def as_dict(self) -> dict[str, Any]:
        document = {"group": self.group, "key": self.key, "label": self.label,
                    "connections": self.connections, "legend": self.legend,
                    "measured": self.measured.as_dict(), "reference": self.reference.as_dict(),
                    "ratio": round(self.ratio, 3),
                    "slice_ratios": [round(r, 3) for r in self.slice_ratios],
                    "cpu_ratio": round(self.cpu_ratio, 3), "ratio_target": self.ratio_target,
                    "ratio_met": self.ratio_met, "notes": list(self.notes), **self.figures}
        if self.as_cost:
            document["cost"] = round(self.cost, 4)
        return document


Row = Measurement | Comparison


def _verdict(met: bool | None) -> str:
    return "-" if met is None else ("met" if met else "NOT MET")


def _spread(ratios: list[float]) -> str:
    return f"{min(ratios):.2f}-{max(ratios):.2f}" if len(ratios) > 1 else "-"


def _groups(rows: list[Row]) -> list[list[Row]]:
    """Consecutive rows of one group together (the core rows are one group)."""
    groups: list[list[Row]] = []
    for row in rows:
        group = row.group if isinstance(row, Comparison) else "core"
        previous = groups[-1][-1] if groups else None
        previous_group = previous.group if isinstance(previous, Comparison) else "core"
        if previous is None or group != previous_group:
            groups.append([])
        groups[-1].append(row)
    return groups


def table(rows: list[Row]) -> str:
    width = max([18, *(len(r.label) for r in rows)])
    columns = [("endpoint / scenario", "", width, "<"), ("conns", "", 5, ">"),
               ("measured", "req/s", 8, ">"), ("reference", "req/s", 9, ">"),
               ("ratio", "", 5, ">"), ("slices", "min-max", 9, ">"), ("target", "", 6, ">"),
               ("", "", 7, "<"), ("p50", "ms", 6, ">"), ("p99", "ms", 6, ">"),
               ("target", "ms", 6, ">"), ("", "", 7, "<"), ("ref p50/p99", "ms", 13, ">")]

    def line(values: list[str]) -> str:
        return " ".join(f"{v:{align}{w}}" for v, (_, _, w, align) in zip(
            values, columns, strict=True)).rstrip()

    lines = [line([c[0] for c in columns]), line([c[1] for c in columns])]
    rule = "-" * len(lines[0])
    for group in _groups(rows):
        lines.append(rule)
        for m in group:
            p, b = m.measured, m.reference
            target = m.ratio_target
            lines.append(line([
                m.label, str(m.connections), f"{p.requests_per_s:.1f}",
                f"{b.requests_per_s:.1f}", f"{m.ratio:.2f}", _spread(m.slice_ratios),
                f">={target:.2f}" if target is not None else "-", _verdict(m.ratio_met),
                f"{p.p50_ms:.2f}", f"{p.p99_ms:.2f}",
                f"<={m.p99_target_ms:g}" if m.p99_target_ms is not None else "-",
                _verdict(m.p99_met), f"{b.p50_ms:.2f}/{b.p99_ms:.2f}",
            ]))
    return "\n".join(lines)


def cpu_table(rows: list[Row]) -> str:
    width = max([18, *(len(r.label) for r in rows)])
    lines = [f"{'endpoint / scenario':<{width}} {'conns':>5} {'measured':>9} {'reference':>9} "
             f"{'ratio':>6} {'target':>7}",
             f"{'':<{width}} {'':>5} {'us/req':>9} {'us/req':>9} {'':>6} {'':>7}"]
    rule = "-" * len(lines[0])
    for group in _groups(rows):
        lines.append(rule)
        for m in group:
            target = m.ratio_target
            lines.append(f"{m.label:<{width}} {m.connections:>5} "
                         f"{m.measured.cpu_us_per_request:>9.0f} "
                         f"{m.reference.cpu_us_per_request:>9.0f} {m.cpu_ratio:>6.2f} "
                         f"{'>=' + format(target, '.2f') if target is not None else '-':>7}")
    return "\n".join(lines)


def rss_lines(peaks: dict[str, dict[int, float]]) -> list[str]:
    lines = [f"Peak RSS per gunicorn worker (VmHWM), target < {RSS_TARGET_MIB:g} MiB for the "
             "provider's:"]
    width = max([9, *(len(name) for name in peaks)])
    for name, workers in peaks.items():
        figures = ", ".join(f"pid {pid}: {mib:.1f} MiB" for pid, mib in workers.items())
        worst = max(workers.values(), default=0.0)
        verdict = "(reference)" if name in REFERENCE_SERVERS else _verdict(worst < RSS_TARGET_MIB)
        lines.append(f"  {name:<{width}} max {worst:6.1f} MiB  {verdict:<11} "
                     f"[{figures or 'no worker seen'}]")
    return lines


def problems(rows: list[Row]) -> list[str]:
    """Runs whose figures include refused or failed requests, or that ran out of DPoP proofs
    (the ratio would mislead)."""
    found = []
    for m in rows:
        names = ("provider", "baseline") if isinstance(m, Measurement) else ("measured", "reference")
        for name, result in zip(names, (m.measured, m.reference), strict=True):
            if result.status_errors or result.socket_errors:
                found.append(f"WARNING: {name} {m.label} c{m.connections}: "
                             f"{result.status_errors} non-2xx answers, "
                             f"{result.socket_errors} socket errors/timeouts "
                             f"out of {result.requests} requests")
            if result.proofs_ran_out:
                found.append(f"WARNING: {name} {m.label} c{m.connections} ran out of DPoP "
                             "proofs: its figures are too low (rerun; the pools are sized from "
                             "the rates seen)")
    return found


@dataclass(frozen=True)
class Run:
    """Everything one ``make bench`` measured, and how."""

    measurements: list[Measurement]
    comparisons: list[Comparison]
    rss_mib: dict[str, dict[int, float]]  # server name -> worker pid -> peak MiB
    noise: Noise
    seconds: float
    warmup_seconds: int
    runtime_s: float
    command: str
    groups: tuple[str, ...] = ()
    group_noise: dict[str, Noise] = field(default_factory=dict)
    machine: dict[str, Any] = field(default_factory=dict)

    @property
    def rows(self) -> list[Row]:
        return [*self.measurements, *self.comparisons]

    @property
    def provider_rss_mib(self) -> float:
        """The largest peak of any provider worker (every server but the references)."""
        return max((mib for name, workers in self.rss_mib.items()
                    if name not in REFERENCE_SERVERS for mib in workers.values()), default=0.0)

    @property
    def rss_met(self) -> bool:
        return self.provider_rss_mib < RSS_TARGET_MIB

    @property
    def verdicts(self) -> list[bool]:
        found: list[bool] = [m.ratio_met for m in self.measurements]
        found += [m.p99_met for m in self.measurements if m.p99_met is not None]
        found += [c.ratio_met for c in self.comparisons if c.ratio_met is not None]
        found.append(self.rss_met)
        return found


def render(run: Run) -> str:
    """The report printed to stdout."""
    cpus = run.machine.get("cpus")
    rows = run.rows
    lines = [
        f"token-provider bench ({', '.join(run.groups)}): {run.seconds:g} s per run, wrk -t2, "
        f"gunicorn provider.serving.SyncWorker x2 --preload, {cpus} CPUs, load average "
        f"{run.machine.get('loadavg_before', [0.0])[0]:.2f} before",
        "ratio = measured req/s / reference req/s, both measured in this run in interleaved "
        "slices; slices = that",
        "ratio in each back-to-back pair of runs; p50/p99 are the measured side's. Core rows: "
        "the provider against",
        "the baseline, a trivial Flask app doing only the inherent HMAC + ES256 work. The "
        "other rows:",
        *(f"  {c.describe()}" for c in run.comparisons),
        "",
        table(rows),
        "",
        "Server CPU time (master + workers, user + system) per request; ratio = "
        "reference/measured, the throughput",
        "ratio without the other load on the machine (for reading, not judged):",
        cpu_table(rows),
        "",
        *rss_lines(run.rss_mib),
        *problems(rows),
        "",
        f"Noise: other processes kept {run.noise.other_share:.0%} of the {cpus} CPUs busy during "
        f"the timed runs (hypervisor steal {run.noise.steal_share:.0%}); the more, the less the "
        "absolute figures mean.",
    ]
    if len(run.group_noise) > 1 or "instances" in run.group_noise:
        lines.append("  by group: " + ", ".join(f"{name} {noise.other_share:.0%}"
                                                for name, noise in run.group_noise.items())
                     + (" (PostgreSQL and Redis serving the instances count as other processes)"
                        if "instances" in run.group_noise else ""))
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
        "groups": list(run.groups),
        "machine": {**run.machine, "other_cpu_share": round(run.noise.other_share, 3),
                    "steal_cpu_share": round(run.noise.steal_share, 3),
                    "other_cpu_share_by_group": {name: round(noise.other_share, 3)
                                                 for name, noise in run.group_noise.items()}},
        "targets": {"ratio": RATIO_TARGETS, "p99_ms": P99_TARGETS_MS, "rss_mib": RSS_TARGET_MIB,
                    "comparison_ratio": COMPARISON_TARGETS},
        "results": [m.as_dict() for m in run.measurements],
        "comparisons": [c.as_dict() for c in run.comparisons],
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
