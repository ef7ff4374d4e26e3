"""A provider instance in a temp dir, its clients and tokens, and the requests the bench sends.

The instance is what ``make run`` sets up (``token-provider init``, SQLite, keys on disk), with
two clients registered through the command line like an operator would, and its rate limits
raised so that the limiter's check is measured but never its refusals (see :func:`config`).
An instance may instead use PostgreSQL and Redis (``database_url``, ``redis_url``), and several
``serve`` processes may run from one instance directory (same keys, same stores).
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlencode

from bench.dpop import ProofKey
from bench.servers import Server, get, post_form
from bench.wrk import Request

EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
ACCESS_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:access_token"
AUDIENCE = "https://api.example/v1"
RESOURCE = "https://api.example/v1/files/1"
SCOPE = "files:read files:write"
NARROW_SCOPE = "files:read"
TOKEN_TTL = 3600  # the tokens sent must stay valid for the whole run
ENDPOINTS = ("client_credentials", "token_exchange", "introspection")
UPSTREAM = "bench"  # the gateway's upstream, served by bench.upstream_app
UPSTREAM_SCOPE = "items:read"
GATEWAY_PATH = f"/gateway/{UPSTREAM}/items/1"
GATEWAY_SUBJECT = "bench-user"


def config(*, upstream_port: int | None = None, audit: bool = True,
           rate_limits: bool = True) -> str:
    """The instance's ``provider.toml``.

    Defaults everywhere, except the rate limits: the bench sends thousands of requests a second
    from one client (and one token family at the gateway), which the defaults (600/minute) would
    mostly refuse, and the gateway's suspension threshold would revoke the family mid-run. The
    limits are raised so that the limiter's bookkeeping is measured, not its refusals, and per
    second, so that its moving window holds about as many entries as a default one does (a
    window holds one entry per request counted in it). ``audit``/``rate_limits`` false turn
    those off, to measure what they cost.

    With ``upstream_port``: the ``[upstreams.bench]`` table (one GET route), tokens minted for a
    connection living an hour rather than five minutes (they must outlive the run), and a DPoP
    ``iat_window`` of ten minutes, the most allowed, since the proofs are made before they are
    sent.
    """
    text = """\
# Written by bench/fixtures.py: defaults, with rate limits far above what the bench sends.
[rate_limits]
token = "1000000/second"
introspect = "1000000/second"
gateway = "1000000/second"
"""
    if not rate_limits:
        text += "enabled = false\n"
    text += """
[rate_limits.suspend]
gateway = "1000000/second"
"""
    if not audit:
        text += "\n[audit]\nenabled = false\n"
    if upstream_port is not None:
        text += f"""
[tokens]
access_token_ttl = {TOKEN_TTL}

[dpop]
iat_window = 600

[upstreams.{UPSTREAM}]
base_url = "http://127.0.0.1:{upstream_port}/api"
[[upstreams.{UPSTREAM}.routes]]
method = "GET"
path = "/items/{{id}}"
scope = "{UPSTREAM_SCOPE}"
"""
    return text


@dataclass(frozen=True)
class Credentials:
    client_id: str
    secret: str

    @property
    def basic(self) -> str:
        raw = f"{quote(self.client_id, safe='')}:{quote(self.secret, safe='')}"
        return "Basic " + base64.b64encode(raw.encode("ascii")).decode("ascii")


def venv_bin() -> Path:
    """The bin directory of the virtualenv this bench runs in (``.venv/bin``)."""
    return Path(sys.executable).parent


class ProviderInstance:
    """Configuration, database and keys of one provider under ``directory``.

    ``port`` is where its first (or only) server listens, and names the issuer; other servers
    of the same instance (:meth:`server` with another port) share everything else.
    """

    def __init__(self, directory: Path, port: int, *, config_text: str | None = None,
                 database_url: str | None = None, redis_url: str = ""):
        self.directory = directory
        self.port = port
        self.issuer = f"http://127.0.0.1:{port}"
        self.config_text = config() if config_text is None else config_text
        self.database_url = database_url or f"sqlite:///{directory / 'provider.db'}"
        self.redis_url = redis_url
        self.exchanger: Credentials | None = None
        self.introspector: Credentials | None = None

    @property
    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("PROVIDER_") and k != "PROMETHEUS_MULTIPROC_DIR"}
        env.update({
            "PROVIDER_CONFIG": str(self.directory / "provider.toml"),
            "PROVIDER_DATABASE_URL": self.database_url,
            "PROVIDER_KEYS_DIR": str(self.directory / "keys"),
            "PROVIDER_ISSUER": self.issuer,
        })
        if self.redis_url:
            env["PROVIDER_REDIS_URL"] = self.redis_url
        return env

    def command(self, *args: str) -> list[str]:
        return [str(venv_bin() / "token-provider"), *args]

    def serve_command(self, workers: int = 2, port: int | None = None) -> list[str]:
        return self.command("serve", "--host", "127.0.0.1", "--port", str(port or self.port),
                            "--workers", str(workers))

    def server(self, name: str, log_dir: Path, workers: int = 2, port: int | None = None) -> Server:
        """A ``token-provider serve`` of this instance (not started), with its own directory
        for the multiprocess metrics, and its temp files in ``log_dir`` (``serve`` makes a
        directory in $TMPDIR even when given one), so that nothing is left in /tmp."""
        metrics = log_dir / f"{name}-metrics"
        metrics.mkdir()
        env = {**self.env, "PROMETHEUS_MULTIPROC_DIR": str(metrics), "TMPDIR": str(log_dir)}
        return Server(name, self.serve_command(workers, port), port or self.port, env,
                      self.directory, log_dir / f"{name}.log", workers=workers)

    def _cli(self, *args: str) -> dict:
        completed = subprocess.run(self.command(*args), env=self.env, cwd=self.directory,
                                   capture_output=True, text=True, check=False)
        if completed.returncode != 0:
            raise RuntimeError(f"token-provider {' '.join(args)} failed "
                               f"({completed.returncode}): {completed.stderr.strip()}")
        return json.loads(completed.stdout)

    def initialize(self) -> None:
        """``token-provider init`` and two clients, like an operator."""
        self.directory.mkdir(exist_ok=True)
        (self.directory / "provider.toml").write_text(self.config_text, encoding="utf-8")
        self._cli("init", "--json")
        created = self._cli("clients", "create", "bench-exchanger",
                            "--grant-type", "client_credentials", "--grant-type", EXCHANGE,
                            "--scope", SCOPE, "--audience", AUDIENCE,
                            "--token-ttl", str(TOKEN_TTL), "--json")
        self.exchanger = Credentials(created["client_id"], created["client_secret"])
        created = self._cli("clients", "create", "bench-introspector",
                            "--grant-type", "client_credentials", "--scope", "introspect",
                            "--introspect", "--token-ttl", str(TOKEN_TTL), "--json")
        self.introspector = Credentials(created["client_id"], created["client_secret"])

    def connect(self, upstream_token_file: Path) -> str:
        """``token-provider connections add`` for the bench's upstream: the access token it
        prints, minted for the connection (its audience is the gateway resource)."""
        answer = self._cli("connections", "add", "--subject", GATEWAY_SUBJECT,
                           "--upstream", UPSTREAM, "--access-token-file", str(upstream_token_file),
                           "--json")
        return answer["access_token"]


@dataclass(frozen=True)
class Workload:
    """The three requests measured, identical for the provider and the baseline."""

    requests: dict[str, Request]
    subject_token: str
    introspected_token: str


def _must(port: int, request: Request, proof: str | None = None) -> dict:
    headers = {"DPoP": proof} if proof else {}
    status, answer = post_form(port, request.path, request.body, request.authorization, headers)
    if status != 200:
        raise RuntimeError(f"POST {request.path} answered {status}: {answer}")
    return answer


def build_workload(instance: ProviderInstance) -> Workload:
    """Get the tokens from the running provider and build the requests around them."""
    exchanger, introspector = instance.exchanger, instance.introspector
    if exchanger is None or introspector is None:
        raise RuntimeError("initialize() first")
    client_credentials = Request("/token", urlencode({"grant_type": "client_credentials",
                                                      "scope": SCOPE}), exchanger.basic)
    subject_token = _must(instance.port, client_credentials)["access_token"]
    exchange = Request("/token", urlencode({
        "grant_type": EXCHANGE, "subject_token": subject_token,
        "subject_token_type": ACCESS_TOKEN_TYPE, "scope": NARROW_SCOPE, "resource": RESOURCE,
    }), exchanger.basic)
    # The introspected token is an exchanged one (depth 1, with a lineage), as a resource
    # server would meet it.
    introspected_token = _must(instance.port, exchange)["access_token"]
    introspection = Request("/introspect", urlencode({"token": introspected_token}),
                            introspector.basic)
    return Workload({"client_credentials": client_credentials, "token_exchange": exchange,
                     "introspection": introspection}, subject_token, introspected_token)


def check_workload(port: int, workload: Workload, server: str) -> None:
    """Each request once: it must succeed (and introspection say active) before it is timed."""
    for name, request in workload.requests.items():
        answer = _must(port, request)
        if name == "introspection" and answer.get("active") is not True:
            raise RuntimeError(f"{server}: the introspected token is not active: {answer}")
        if name != "introspection" and "access_token" not in answer:
            raise RuntimeError(f"{server}: {name} answered no access_token: {answer}")


@dataclass(frozen=True)
class DPoPWorkload:
    """A DPoP-bound exchange (a bound subject token, a fresh proof by its key each time) and
    the introspection of a DPoP-bound token, next to :class:`Workload`'s bearer ones."""

    exchange: Request
    introspection: Request


def build_dpop_workload(instance: ProviderInstance, key: ProofKey) -> DPoPWorkload:
    """Get a DPoP-bound subject token (client_credentials with a proof), and one exchanged from
    it (depth 1, bound, like :func:`build_workload`'s bearer one) to introspect."""
    exchanger, introspector = instance.exchanger, instance.introspector
    if exchanger is None or introspector is None:
        raise RuntimeError("initialize() first")
    credentials = Request("/token", urlencode({"grant_type": "client_credentials",
                                               "scope": SCOPE}), exchanger.basic)
    subject = _must(instance.port, credentials, key.proof())
    if subject.get("token_type") != "DPoP":
        raise RuntimeError(f"a token asked for with a DPoP proof is not bound: {subject}")
    exchange = Request("/token", urlencode({
        "grant_type": EXCHANGE, "subject_token": subject["access_token"],
        "subject_token_type": ACCESS_TOKEN_TYPE, "scope": NARROW_SCOPE, "resource": RESOURCE,
    }), exchanger.basic, dpop=True)
    exchanged = _must(instance.port, exchange, key.proof())
    if exchanged.get("token_type") != "DPoP":
        raise RuntimeError(f"the DPoP exchange issued an unbound token: {exchanged}")
    introspection = Request("/introspect", urlencode({"token": exchanged["access_token"]}),
                            introspector.basic)
    answer = _must(instance.port, introspection)
    if answer.get("active") is not True or "cnf" not in answer:
        raise RuntimeError(f"the DPoP-bound token does not introspect as bound: {answer}")
    return DPoPWorkload(exchange, introspection)


def gateway_request(token: str) -> Request:
    """``GET /gateway/bench/items/1`` with a connection's token; the baseline serves the same
    path (see ``bench.baseline_app``)."""
    return Request(GATEWAY_PATH, "", f"Bearer {token}", method="GET")


def check_gateway(port: int, request: Request, server: str) -> None:
    """One call: it must reach the upstream and come back with its answer."""
    status, body = get(port, request.path, request.authorization)
    if status != 200 or b'"ok": true' not in body:
        raise RuntimeError(f"{server}: GET {request.path} answered {status}: {body[:300]!r}")


def baseline_config(instance: ProviderInstance, path: Path,
                    upstream: dict[str, str] | None = None) -> Path:
    """The baseline's settings: the same credentials and the provider's public key, and the
    upstream its gateway handler calls (``{"base_url", "token"}``)."""
    url = f"http://127.0.0.1:{instance.port}/.well-known/jwks.json"
    with urllib.request.urlopen(url, timeout=10) as response:
        jwks = json.loads(response.read())
    keys = [k for k in jwks["keys"] if k.get("alg") == "ES256"]
    if not keys:
        raise RuntimeError("the provider publishes no ES256 key (keys.algorithm must be ES256)")
    credentials = [c for c in (instance.exchanger, instance.introspector) if c is not None]
    path.write_text(json.dumps({
        "issuer": instance.issuer,
        "clients": {c.client_id: c.secret for c in credentials},
        "verify_jwk": keys[-1],
        "upstream": upstream,
    }), encoding="utf-8")
    return path

