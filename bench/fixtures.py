"""A provider instance in a temp dir, its clients and tokens, and the requests the bench sends.

The instance is what ``make run`` sets up (``token-provider init``, SQLite, keys on disk), with
two clients registered through the command line like an operator would, and its rate limits
raised so that the limiter's check is measured but never its refusals (see ``CONFIG``).
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

from bench.servers import post_form
from bench.wrk import Request

EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
ACCESS_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:access_token"
AUDIENCE = "https://api.example/v1"
RESOURCE = "https://api.example/v1/files/1"
SCOPE = "files:read files:write"
NARROW_SCOPE = "files:read"
TOKEN_TTL = 3600  # the tokens sent must stay valid for the whole run
ENDPOINTS = ("client_credentials", "token_exchange", "introspection")

# Defaults everywhere, except the rate limits: the bench sends thousands of requests a second
# from one client, which the defaults (600/minute) would mostly refuse. The limits are raised so
# that the limiter's bookkeeping is measured, not its refusals, and per second, so that its
# moving window holds about as many entries as a default one does (a window holds one entry
# per request counted in it).
CONFIG = """\
# Written by bench/fixtures.py: defaults, with rate limits far above what the bench sends.
[rate_limits]
token = "1000000/second"
introspect = "1000000/second"
"""


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
    """Configuration, database and keys of one provider under ``directory``."""

    def __init__(self, directory: Path, port: int):
        self.directory = directory
        self.port = port
        self.issuer = f"http://127.0.0.1:{port}"
        self.exchanger: Credentials | None = None
        self.introspector: Credentials | None = None

    @property
    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PROVIDER_")}
        env.update({
            "PROVIDER_CONFIG": str(self.directory / "provider.toml"),
            "PROVIDER_DATABASE_URL": f"sqlite:///{self.directory / 'provider.db'}",
            "PROVIDER_KEYS_DIR": str(self.directory / "keys"),
            "PROVIDER_ISSUER": self.issuer,
        })
        return env

    def command(self, *args: str) -> list[str]:
        return [str(venv_bin() / "token-provider"), *args]

    def serve_command(self, workers: int = 2) -> list[str]:
        return self.command("serve", "--host", "127.0.0.1", "--port", str(self.port),
                            "--workers", str(workers))

    def _cli(self, *args: str) -> dict:
        completed = subprocess.run(self.command(*args), env=self.env, cwd=self.directory,
                                   capture_output=True, text=True, check=False)
        if completed.returncode != 0:
            raise RuntimeError(f"token-provider {' '.join(args)} failed "
                               f"({completed.returncode}): {completed.stderr.strip()}")
        return json.loads(completed.stdout)

    def initialize(self) -> None:
        """``token-provider init`` and two clients, like an operator."""
        (self.directory / "provider.toml").write_text(CONFIG, encoding="utf-8")
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


@dataclass(frozen=True)
class Workload:
    """The three requests measured, identical for the provider and the baseline."""

    requests: dict[str, Request]
    subject_token: str
    introspected_token: str


def _must(port: int, request: Request) -> dict:
    status, answer = post_form(port, request.path, request.body, request.authorization)
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


def baseline_config(instance: ProviderInstance, path: Path) -> Path:
    """The baseline's settings: the same credentials and the provider's public key."""
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
    }), encoding="utf-8")
    return path

