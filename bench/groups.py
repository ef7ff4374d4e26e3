"""The bench's groups of measurements; ``BENCH_ONLY=core,gateway,...`` runs some of them.

``core``
    The provider against the baseline app (``bench.baseline_app``), per endpoint (client
    credentials, token exchange, introspection), at 4 and 32 connections.
``gateway``
    ``GET /gateway/bench/items/1`` through the provider against the baseline's handler calling
    the same upstream directly; the upstream is ``bench.upstream_app`` under gunicorn (one
    gthread worker, keep-alive), separate from both and several times faster than either.
``dpop``
    The token exchange with a fresh DPoP proof per request (a bound subject token, proofs by its
    key) against the plain exchange; introspection of a DPoP-bound token against a bearer one.
    All on the core provider (SQLite, so each proof's ``jti`` is spent with a database insert).
``instances``
    The token exchange on PostgreSQL (a schema of its own, dropped at the end) and Redis (a
    database of its own, flushed before and after): two ``serve --workers 1`` instances driven
    together (two wrk at once, half the connections each) against one ``--workers 2``, and that
    one against the core SQLite instance (2 workers).
``overhead``
    The token exchange with the audit trail and rate limits on (the limits high) against both
    off, on two fresh SQLite instances, for three times ``BENCH_SECONDS`` a side.

Each measurement alternates its setups in slices of about two seconds, ABBA (or ABC CBA), so
that a burst of load from elsewhere on the machine hits them alike; each group's timed runs are
metered for noise. Servers only one group needs are stopped when it ends; the others (the core
provider and the baseline) when the bench ends. Every server goes, whatever happens.
"""

from __future__ import annotations

import math
import os
import secrets
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

from bench import fixtures, report, wrk
from bench.dpop import ProofKey
from bench.noise import CpuMeter, Noise
from bench.servers import RssSampler, Server, free_port

REPO = Path(__file__).resolve().parent.parent
# The instances group runs last: PostgreSQL goes on writing (checkpoints, the dropped schema)
# after it, and the overhead group measured after it once read 0.81 where it reads 0.91 alone.
GROUPS = ("core", "gateway", "dpop", "overhead", "instances")
CONNECTIONS = (4, 32)  # core and gateway
DPOP_CONNECTIONS = 4
INSTANCES_CONNECTIONS = 8  # in all; the two single-worker instances get half each
OVERHEAD_CONNECTIONS = 4
# The overhead group's target is a small difference between two similar figures: measured for
# 8 seconds a side it read costs from -3.5% to 18% minutes apart on a noisy machine, for 30
# seconds a side 8% and 10%. It runs this many times BENCH_SECONDS.
OVERHEAD_LENGTH = 3
WORKERS = 2  # the provider's production default (``serve --workers``)
WARMUP_CONNECTIONS = 8
# Each measurement is cut into runs of about this many seconds, alternating its setups, so that
# a burst of load from elsewhere on the machine hits them alike.
SLICE_SECONDS = 2
# DPoP proofs made for each timed run: this many times the highest exchange rate seen so far,
# times the run's length (at least PROOF_FLOOR); a thread that runs out stops, and is reported.
PROOF_MARGIN = 2.0
PROOF_FLOOR = 2000
POSTGRES_URL = os.environ.get("BENCH_POSTGRES_URL",
                              "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/15")

Run = Callable[[int], wrk.Slice]
"""One timed wrk run of so many seconds against one setup."""


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def slices(seconds: float) -> tuple[int, int]:
    """How many wrk runs of how many whole seconds make up one measurement of ``seconds``."""
    count = max(1, round(seconds / SLICE_SECONDS))
    return count, max(1, round(seconds / count))


@dataclass
class Core:
    """The core provider (SQLite, 2 workers), which the gateway, DPoP and instances groups
    measure too, and what it needs."""

    instance: fixtures.ProviderInstance
    provider: Server
    workload: fixtures.Workload
    scripts: dict[str, Path]
    warmup_script: Path  # every request of the workload in turn
    upstream_port: int
    upstream_token: str


@dataclass
class Context:
    wrk_path: str
    work: Path
    seconds: float
    warmup: int
    sampler: RssSampler
    servers: list[Server] = field(default_factory=list)
    measurements: list[report.Measurement] = field(default_factory=list)
    comparisons: list[report.Comparison] = field(default_factory=list)
    noise: dict[str, Noise] = field(default_factory=dict)
    _core: Core | None = None
    _baseline: Server | None = None

    # Servers ------------------------------------------------------------------------------

    def start(self, server: Server) -> Server:
        """Start ``server``; it is stopped at the end of the bench at the latest."""
        self.servers.append(server)
        server.start()
        self.sampler.add(server)
        return server

    def stop(self, server: Server) -> None:
        self.sampler.sample()  # the last peaks before it goes
        server.stop()

    def core(self) -> Core:
        """The core provider, started (and warmed up) the first time a group needs it."""
        if self._core is not None:
            return self._core
        upstream_port = free_port()
        instance = fixtures.ProviderInstance(
            self.work / "provider", free_port(),
            config_text=fixtures.config(upstream_port=upstream_port))
        progress("bench: token-provider init, clients create ...")
        instance.initialize()
        provider = self.start(instance.server("provider", self.work, WORKERS))
        workload = fixtures.build_workload(instance)
        fixtures.check_workload(provider.port, workload, provider.name)
        scripts = {name: wrk.write_script(self.work, name, [request])
                   for name, request in workload.requests.items()}
        warmup = wrk.write_script(self.work, "warmup", list(workload.requests.values()))
        self._core = Core(instance, provider, workload, scripts, warmup, upstream_port,
                          secrets.token_urlsafe(24))
        self.warm_up(provider, warmup)
        return self._core

    def baseline(self) -> Server:
        """The baseline app, under the same gunicorn settings as the provider."""
        if self._baseline is not None:
            return self._baseline
        core = self.core()
        config = fixtures.baseline_config(
            core.instance, self.work / "baseline.json",
            {"base_url": f"http://127.0.0.1:{core.upstream_port}/api", "token": core.upstream_token})
        env = {**os.environ, "BENCH_BASELINE_CONFIG": str(config), "PYTHONPATH": str(REPO)}
        port = free_port()
        command = [str(fixtures.venv_bin() / "gunicorn"), "-w", str(WORKERS),
                   "-k", "provider.serving.SyncWorker",
                   "--preload", "-b", f"127.0.0.1:{port}", "--timeout", "60",
                   "--graceful-timeout", "10", "bench.baseline_app:app"]
        baseline = self.start(Server("baseline", command, port, env, REPO,
                                     self.work / "baseline.log", workers=WORKERS))
        self._baseline = baseline
        fixtures.check_workload(baseline.port, core.workload, baseline.name)
        progress(f"bench: provider on :{core.provider.port} (workers "
                 f"{core.provider.worker_pids()}), baseline on :{baseline.port} (workers "
                 f"{baseline.worker_pids()})")
        self.warm_up(baseline, core.warmup_script)
        return baseline

    # Runs ---------------------------------------------------------------------------------

    def warm_up(self, server: Server, script: Path, connections: int = WARMUP_CONNECTIONS,
                proofs: Path | None = None) -> wrk.Slice:
        progress(f"bench: warm-up {server.name} {self.warmup} s")
        return self.timed([server], [wrk.Load(script, server.port, connections, proofs=proofs)],
                          self.warmup)

    def timed(self, servers: list[Server], loads: list[wrk.Load], seconds: int) -> wrk.Slice:
        """wrk runs made at the same time (one per load) as one slice, with the CPU time the
        servers spent meanwhile."""
        before = sum(server.cpu_seconds() for server in servers)
        try:
            results = wrk.run_together(self.wrk_path, loads, seconds)
        except RuntimeError:
            for server in servers:
                server.ensure_running()  # a dead server explains itself better than wrk does
            raise
        for server in servers:
            server.ensure_running()
        merged = results[0] if len(results) == 1 else wrk.concurrent(results)
        return replace(merged, cpu_s=sum(server.cpu_seconds() for server in servers) - before)

    def run_of(self, server: Server, script: Path, connections: int) -> Run:
        return lambda seconds: self.timed([server], [wrk.Load(script, server.port, connections)],
                                          seconds)

    def interleave(self, sides: list[tuple[str, Run]],
                   seconds: float | None = None) -> dict[str, wrk.WrkResult]:
        """Each side's slices, run in turn: A B, B A, A B ... (A B C, C B A, ... for three);
        ``seconds`` a side (default ``BENCH_SECONDS``)."""
        count, length = slices(self.seconds if seconds is None else seconds)
        runs: dict[str, list[wrk.Slice]] = {name: [] for name, _ in sides}
        for index in range(count):
            for name, run in (sides if index % 2 == 0 else sides[::-1]):
                runs[name].append(run(length))
        return {name: wrk.WrkResult(tuple(pieces)) for name, pieces in runs.items()}

    @contextmanager
    def metered(self, group: str) -> Iterator[None]:
        """How busy the rest of the machine was during the block (the group's timed runs)."""
        meter = CpuMeter(lambda: sum(s.cpu_seconds() for s in self.servers if s.process))
        with meter:
            yield
        self.noise[group] = meter.noise

    def compare(self, comparison: report.Comparison) -> None:
        self.comparisons.append(comparison)
        c = comparison
        progress(f"bench: {c.label:<28} c{c.connections:<3} measured "
                 f"{c.measured.requests_per_s:7.1f} req/s, reference "
                 f"{c.reference.requests_per_s:7.1f} req/s, ratio {c.ratio:.2f}")


# The groups -------------------------------------------------------------------------------


def core(ctx: Context) -> None:
    setup, baseline = ctx.core(), ctx.baseline()
    with ctx.metered("core"):
        for endpoint in fixtures.ENDPOINTS:
            for connections in CONNECTIONS:
                results = ctx.interleave([
                    ("provider", ctx.run_of(setup.provider, setup.scripts[endpoint], connections)),
                    ("baseline", ctx.run_of(baseline, setup.scripts[endpoint], connections))])
                m = report.Measurement(endpoint, connections, results["provider"],
                                       results["baseline"])
                ctx.measurements.append(m)
                progress(f"bench: {endpoint:<18} c{connections:<3} provider "
                         f"{m.provider.requests_per_s:7.1f} req/s, baseline "
                         f"{m.baseline.requests_per_s:7.1f} req/s, ratio {m.ratio:.2f}")


def _upstream_server(ctx: Context, setup: Core) -> Server:
    env = {**os.environ, "BENCH_UPSTREAM_TOKEN": setup.upstream_token, "PYTHONPATH": str(REPO)}
    command = [str(fixtures.venv_bin() / "gunicorn"), "-w", "1", "-k", "gthread",
               "--threads", "4", "--keep-alive", "75", "-b", f"127.0.0.1:{setup.upstream_port}",
               "bench.upstream_app:app"]
    return Server("upstream", command, setup.upstream_port, env, REPO, ctx.work / "upstream.log",
                  workers=1)


def gateway(ctx: Context) -> None:
    setup, baseline = ctx.core(), ctx.baseline()
    upstream = ctx.start(_upstream_server(ctx, setup))
    try:
        token_file = ctx.work / "upstream-token"
        token_file.write_text(setup.upstream_token, encoding="ascii")
        request = fixtures.gateway_request(setup.instance.connect(token_file))
        for server in (setup.provider, baseline):
            fixtures.check_gateway(server.port, request, server.name)
        script = wrk.write_script(ctx.work, "gateway", [request])
        for server in (setup.provider, baseline):
            ctx.warm_up(server, script)
        with ctx.metered("gateway"):
            for connections in CONNECTIONS:
                started, cpu = time.monotonic(), upstream.cpu_seconds()
                results = ctx.interleave([
                    ("provider", ctx.run_of(setup.provider, script, connections)),
                    ("baseline", ctx.run_of(baseline, script, connections))])
                busy = (upstream.cpu_seconds() - cpu) / (time.monotonic() - started)
                ctx.compare(report.Comparison(
                    "gateway", "gateway", "gateway GET", connections, results["provider"],
                    results["baseline"],
                    f"provider GET {fixtures.GATEWAY_PATH} vs the baseline's handler (Bearer, "
                    "ES256 verify, pooled urllib3 call), same upstream",
                    notes=(f"the upstream (gunicorn gthread x1) used {busy:.0%} of a CPU",),
                    figures={"upstream_cpu_share": round(busy, 3)}))
    finally:
        ctx.stop(upstream)


class _Proofs:
    """Each DPoP run's proofs, made just before it, as many as :data:`PROOF_MARGIN` times the
    highest exchange rate seen (with or without DPoP) allows for."""

    def __init__(self, key: ProofKey, path: Path):
        self.key = key
        self.path = path
        self.rate = 0.0

    def seen(self, result: wrk.Slice) -> wrk.Slice:
        self.rate = max(self.rate, result.requests_per_s)
        return result

    def file(self, seconds: int) -> Path:
        return self.key.write(self.path, max(PROOF_FLOOR, math.ceil(self.rate * seconds * PROOF_MARGIN)))


def dpop(ctx: Context) -> None:
    setup = ctx.core()
    provider = setup.provider
    key = ProofKey(htu=setup.instance.issuer + "/token")
    workload = fixtures.build_dpop_workload(setup.instance, key)
    exchange = wrk.write_script(ctx.work, "exchange_dpop", [workload.exchange])
    introspection = wrk.write_script(ctx.work, "introspection_dpop", [workload.introspection])
    proofs = _Proofs(key, ctx.work / "proofs.txt")
    proofs.seen(ctx.warm_up(provider, setup.scripts["token_exchange"]))
    proofs.seen(ctx.warm_up(provider, exchange, proofs=proofs.file(ctx.warmup)))
    c = DPOP_CONNECTIONS

    def with_proofs(seconds: int) -> wrk.Slice:
        load = wrk.Load(exchange, provider.port, c, proofs=proofs.file(seconds))
        return proofs.seen(ctx.timed([provider], [load], seconds))

    plain = ctx.run_of(provider, setup.scripts["token_exchange"], c)
    generated = key.generated
    with ctx.metered("dpop"):
        results = ctx.interleave([("dpop", with_proofs),
                                  ("plain", lambda seconds: proofs.seen(plain(seconds)))])
        made = key.generated - generated
        used = results["dpop"].proofs_used
        ran_out = " RAN OUT (figures invalid)" if results["dpop"].proofs_ran_out else ", none ran out"
        ctx.compare(report.Comparison(
            "dpop", "dpop_exchange", "exchange DPoP / bearer", c, results["dpop"], results["plain"],
            "exchange of a DPoP-bound token, a fresh proof per request, vs the plain exchange "
            "of a bearer token",
            notes=(f"proofs {used} used of {made} made{ran_out}",),
            figures={"proofs_made": made, "proofs_used": used,
                     "proofs_ran_out": results["dpop"].proofs_ran_out}))
        results = ctx.interleave([
            ("bound", ctx.run_of(provider, introspection, c)),
            ("bearer", ctx.run_of(provider, setup.scripts["introspection"], c))])
        ctx.compare(report.Comparison(
            "dpop", "dpop_introspection", "introspect DPoP / bearer", c, results["bound"],
            results["bearer"], "introspection of a DPoP-bound token vs a bearer token"))


def _postgres(url: str) -> str:
    """psycopg's spelling of a SQLAlchemy ``postgresql+psycopg://`` URL."""
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


def instances(ctx: Context) -> None:
    import psycopg
    import redis

    setup = ctx.core()
    schema = "bench_" + secrets.token_hex(6)
    store = redis.Redis.from_url(REDIS_URL)
    with psycopg.connect(_postgres(POSTGRES_URL), autocommit=True) as connection:
        connection.execute(f'CREATE SCHEMA "{schema}"')
    store.flushdb()
    private: list[Server] = []
    try:
        separator = "&" if "?" in POSTGRES_URL else "?"
        instance = fixtures.ProviderInstance(
            ctx.work / "pg", free_port(), database_url=f"{POSTGRES_URL}{separator}"
            f"options=-csearch_path%3D{schema}", redis_url=REDIS_URL)
        progress(f"bench: token-provider init on PostgreSQL (schema {schema}) and {REDIS_URL} ...")
        instance.initialize()
        for name, workers, port in (("pg-1w-a", 1, instance.port), ("pg-1w-b", 1, free_port()),
                                    ("pg-2w", 2, free_port())):
            private.append(ctx.start(instance.server(name, ctx.work, workers, port)))
        first, second, both = private
        workload = fixtures.build_workload(instance)
        for server in private:
            fixtures.check_workload(server.port, workload, server.name)
        script = wrk.write_script(ctx.work, "exchange_pg", [workload.requests["token_exchange"]])
        half = INSTANCES_CONNECTIONS // 2

        def pair(seconds: int) -> wrk.Slice:
            return ctx.timed([first, second], [wrk.Load(script, first.port, half, threads=1),
                                               wrk.Load(script, second.port, half, threads=1)],
                             seconds)

        progress(f"bench: warm-up {first.name} + {second.name} {ctx.warmup} s")
        pair(ctx.warmup)
        ctx.warm_up(both, script)
        c = INSTANCES_CONNECTIONS
        with ctx.metered("instances"):
            results = ctx.interleave([
                ("pair", pair), ("pg", ctx.run_of(both, script, c)),
                ("sqlite", ctx.run_of(setup.provider, setup.scripts["token_exchange"], c))])
            ctx.compare(report.Comparison(
                "instances", "instances_scale_out", "exchange 2x1w / 1x2w (PG)", c,
                results["pair"], results["pg"],
                f"2 x serve --workers 1 driven together (2 wrk x c{half}, req/s summed) vs "
                "1 x --workers 2, same PostgreSQL + Redis"))
            ctx.compare(report.Comparison(
                "instances", "instances_stores", "exchange PG+Redis / SQLite", c, results["pg"],
                results["sqlite"],
                "serve --workers 2 on PostgreSQL + Redis vs the core one on SQLite"))
    finally:
        for server in private:
            ctx.stop(server)
        with psycopg.connect(_postgres(POSTGRES_URL), autocommit=True) as connection:
            connection.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        store.flushdb()
        store.close()


def overhead(ctx: Context) -> None:
    private: list[Server] = []
    try:
        scripts = {}
        for name, text in (("on", fixtures.config()),
                           ("off", fixtures.config(audit=False, rate_limits=False))):
            instance = fixtures.ProviderInstance(ctx.work / f"overhead-{name}", free_port(),
                                                 config_text=text)
            progress(f"bench: token-provider init (audit and rate limits {name}) ...")
            instance.initialize()
            server = ctx.start(instance.server(f"overhead-{name}", ctx.work, WORKERS))
            private.append(server)
            workload = fixtures.build_workload(instance)
            fixtures.check_workload(server.port, workload, server.name)
            scripts[name] = wrk.write_script(ctx.work, f"exchange_{name}",
                                             [workload.requests["token_exchange"]])
            ctx.warm_up(server, wrk.write_script(ctx.work, f"warmup_{name}",
                                                 list(workload.requests.values())))
        on, off = private
        c = OVERHEAD_CONNECTIONS
        with ctx.metered("overhead"):
            results = ctx.interleave([("on", ctx.run_of(on, scripts["on"], c)),
                                      ("off", ctx.run_of(off, scripts["off"], c))],
                                     ctx.seconds * OVERHEAD_LENGTH)
            ctx.compare(report.Comparison(
                "overhead", "overhead", "exchange audit+limits on/off", c, results["on"],
                results["off"],
                "[audit] and rate limits on (limits high) vs both off, two fresh SQLite "
                "instances", as_cost=True))
    finally:
        for server in private:
            ctx.stop(server)


RUNS: dict[str, Callable[[Context], None]] = {
    "core": core, "gateway": gateway, "dpop": dpop, "instances": instances, "overhead": overhead}
