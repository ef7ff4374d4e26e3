"""The ``token-provider`` command line (also ``python -m provider``).

Modules that import ``prometheus_client`` (the service, the views, errors, connections) are
imported inside the commands that need them: ``serve`` must set ``PROMETHEUS_MULTIPROC_DIR``
before that library is first imported, so that gunicorn's workers share their metrics.

Every command that prints data takes ``--json`` and then prints exactly one JSON document on
stdout. Secrets are printed once, when created. A bad configuration prints one line,
``config error: …``, and exits with status 2; a refused operation prints ``error: …`` and exits
with status 1.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from functools import wraps
from pathlib import Path
from typing import Any

import click

from provider import config
from provider.clients import (
    AUTH_METHODS,
    CLIENT_ID,
    GRANT_TYPES,
    Client,
    RegistrationError,
    register_client,
)
from provider.clients import rotate_secret as rotate_client_secret
from provider.config import ConfigError, Settings
from provider.keys import KeyOperationError, add_signing_key, key_states, retire_signing_key


def _iso(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="seconds").replace(
        "+00:00", "Z")


def _emit(as_json: bool, document: Any, lines: Callable[[], list[str]]) -> None:
    if as_json:
        click.echo(json.dumps(document, indent=2, sort_keys=False))
    else:
        for line in lines():
            click.echo(line)


def _settings() -> Settings:
    return config.load()


def _provider():
    from provider.service import Provider

    provider = Provider(_settings())
    provider.start()
    return provider


def guarded(function: Callable) -> Callable:
    """Turn refusals into one line on stderr and the documented exit status."""

    @wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except ConfigError as exc:
            click.echo(f"config error: {exc}", err=True)
            sys.exit(2)
        except (RegistrationError, KeyOperationError) as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(1)

    return wrapper


json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """Internal OAuth 2.0 token provider."""


def main() -> None:
    cli(prog_name="token-provider")


# init / serve -------------------------------------------------------------------------------


@cli.command()
@json_option
@guarded
def init(as_json: bool) -> None:
    """Create keys, the database schema and a commented default config (idempotent)."""
    from provider.service import initialize

    config_path = Path(os.environ.get("PROVIDER_CONFIG") or "instance/provider.toml")
    wrote_config = False
    if not config_path.exists():
        config_path.parent.mkdir(parents=True, exist_ok=True)
        config_path.write_text(config.DEFAULT_FILE, encoding="utf-8")
        wrote_config = True
    created = initialize(_settings())
    result = {"config": str(config_path), "config_created": wrote_config,
              "database": "migrated", **created}
    _emit(as_json, result, lambda: [
        f"config: {config_path}{' (created)' if wrote_config else ''}",
        "database: up to date",
        f"signing key: {'created' if created['signing_key_created'] else 'present'}",
    ])


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8080, show_default=True, type=click.IntRange(1, 65535))
@click.option("--workers", default=2, show_default=True, type=click.IntRange(1, 64))
@click.option("--role", type=click.Choice(config.ROLES), default=None,
              help="Overrides PROVIDER_ROLE.")
@guarded
def serve(host: str, port: int, workers: int, role: str | None) -> None:
    """Serve HTTP with gunicorn (sync workers, application loaded before forking)."""
    import gc
    import tempfile

    from gunicorn.app.base import BaseApplication

    if "prometheus_client" in sys.modules:  # a top-level import crept in: see the module doc
        raise ConfigError("internal: prometheus_client was imported before serve could configure it")
    # gunicorn's workers are separate processes: they share metrics through files here.
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="provider-metrics-")
    _log_to_stderr()
    from provider import create_app

    if role:
        os.environ["PROVIDER_ROLE"] = role
    app = create_app()  # Fails here, with its one line, on bad configuration.
    if workers > 1 and not app.extensions["settings"].redis_url:
        click.echo(f"warning: {workers} workers without PROVIDER_REDIS_URL: rate limits count per "
                   "worker process (set PROVIDER_REDIS_URL to share them)", err=True)

    # Everything loaded so far lives as long as the process: out of the collector's sight, a
    # full collection in a worker no longer walks it (a 40-50 ms pause every few thousand
    # requests, measured in one process; under 7 ms with this) nor copies its pages after fork.
    gc.collect()
    gc.freeze()

    class Server(BaseApplication):
        def load_config(self) -> None:
            settings = {
                "bind": f"{host}:{port}",
                "workers": workers,
                "worker_class": "provider.serving.SyncWorker",  # gunicorn's sync, closing promptly
                "preload_app": True,
                "timeout": 60,
                "graceful_timeout": 10,
                "errorlog": "-",
                # gunicorn's control socket is one per user by default: a second server would
                # take it over from the first. `serve` needs none.
                "control_socket_disable": True,
                "post_fork": lambda _server, _worker: app.extensions["provider"].after_fork(),
                "worker_exit": lambda _server, _worker: app.extensions["provider"].audit.close(),
            }
            for key, value in settings.items():
                if key in self.cfg.settings:  # older gunicorns have no control socket settings
                    self.cfg.set(key, value)

        def load(self):
            return app

    Server().run()


def _log_to_stderr() -> None:
    """The provider's log on stderr, beside gunicorn's: audit events as bare JSON lines (one per
    event, for log pipelines), everything else with time, process, level and logger."""
    import logging

    audit = logging.getLogger("provider.audit")
    audit_handler = logging.StreamHandler(sys.stderr)
    audit_handler.setFormatter(logging.Formatter("%(message)s"))
    audit.addHandler(audit_handler)
    audit.propagate = False
    provider = logging.getLogger("provider")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(
        "[%(asctime)s] [%(process)d] [%(levelname)s] %(name)s: %(message)s"))
    provider.addHandler(handler)
    provider.setLevel(logging.INFO)


# keys ---------------------------------------------------------------------------------------


@cli.group()
def keys() -> None:
    """Signing keys: list, rotate, retire."""


def _key_view(entry: dict[str, Any]) -> dict[str, Any]:
    return {"kid": entry["kid"], "alg": entry["alg"], "state": entry["state"],
            "created_at": _iso(entry["created_at"]), "signs_from": _iso(entry["signs_from"])}


def _expiry(settings: Settings) -> int:
    return settings.tokens.max_access_token_ttl + settings.tokens.leeway


@keys.command("list")
@json_option
@guarded
def keys_list(as_json: bool) -> None:
    provider = _provider()
    states = key_states(provider.storage.list_signing_keys(), time.time(),
                        _expiry(provider.settings))
    document = {"keys": [_key_view(s) for s in states]}
    _emit(as_json, document, lambda: [
        f"{k['kid']}  {k['alg']:6} {k['state']:9} created {k['created_at']}"
        for k in document["keys"]])


@keys.command("rotate")
@json_option
@guarded
def keys_rotate(as_json: bool) -> None:
    """Add a key: published at once, signing after keys.publish_delay."""
    provider = _provider()
    settings = provider.settings
    row = add_signing_key(provider.storage, settings.keys_dir, settings.keys.algorithm,
                          settings.keys.publish_delay)
    state = next(s for s in key_states(provider.storage.list_signing_keys(), time.time(),
                                       _expiry(settings)) if s["kid"] == row["kid"])
    view = _key_view(state)
    _emit(as_json, view, lambda: [f"{view['kid']} {view['state']}, signs from {view['signs_from']}"])


@keys.command("retire")
@click.argument("kid")
@click.option("--force", is_flag=True, help="Retire before its tokens expire (compromised key).")
@json_option
@guarded
def keys_retire(kid: str, force: bool, as_json: bool) -> None:
    provider = _provider()
    settings = provider.settings
    entry = retire_signing_key(provider.storage, settings.keys_dir, kid, _expiry(settings), force)
    view = _key_view(entry)
    _emit(as_json, view, lambda: [f"{kid} retired"])


# clients ------------------------------------------------------------------------------------


@cli.group()
def clients() -> None:
    """Registered clients."""


@clients.command("create")
@click.argument("client_id")
@click.option("--grant-type", "grant_types", multiple=True, required=True,
              type=click.Choice(GRANT_TYPES))
@click.option("--scope", required=True, help="Space-separated scopes.")
@click.option("--audience", "audiences", multiple=True)
@click.option("--redirect-uri", "redirect_uris", multiple=True)
@click.option("--auth-method", type=click.Choice(AUTH_METHODS), default="client_secret_basic",
              show_default=True)
@click.option("--jwks-file", type=click.Path(exists=True, dir_okay=False))
@click.option("--allow-ip", "allowed_ips", multiple=True, help="CIDR range.")
@click.option("--token-ttl", type=int)
@click.option("--may-act")
@click.option("--introspect", is_flag=True)
@click.option("--revoke-any", is_flag=True)
@click.option("--connections", is_flag=True)
@click.option("--dpop-required", is_flag=True)
@json_option
@guarded
def clients_create(client_id: str, jwks_file: str | None, as_json: bool, **options: Any) -> None:
    provider = _provider()
    settings = provider.settings
    jwks = None
    if jwks_file:
        try:
            jwks = json.loads(Path(jwks_file).read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError):
            raise RegistrationError("the JWKS file is not JSON") from None
    client, secret = register_client(
        provider.storage, provider.hasher, issuer=settings.issuer,
        max_ttl=settings.tokens.max_access_token_ttl, client_id=client_id, jwks=jwks,
        grant_types=list(options.pop("grant_types")), audiences=list(options.pop("audiences")),
        redirect_uris=list(options.pop("redirect_uris")),
        allowed_ips=list(options.pop("allowed_ips")), **options,
    )
    document: dict[str, Any] = {"client_id": client.client_id}
    if secret is not None:
        document["client_secret"] = secret
    lines = [f"client_id: {client.client_id}"]
    if secret is not None:
        lines.append(f"client_secret: {secret}  (shown once; store it now)")
    _emit(as_json, document, lambda: lines)


@clients.command("list")
@json_option
@guarded
def clients_list(as_json: bool) -> None:
    from provider.clients import Client

    provider = _provider()
    views = [_client_view(Client.from_row(r)) for r in provider.storage.list_clients()]
    _emit(as_json, views, lambda: [
        f"{v['client_id']}  {v['auth_method']}  {' '.join(v['grant_types'])}" for v in views])


def _client_view(client: Any) -> dict[str, Any]:
    view = client.describe()
    view["created_at"] = _iso(view["created_at"])
    return view


@clients.command("show")
@click.argument("client_id")
@json_option
@guarded
def clients_show(client_id: str, as_json: bool) -> None:
    provider = _provider()
    client = provider.clients.get(client_id)
    if client is None:
        raise RegistrationError(f"no client {client_id!r}")
    view = _client_view(client)
    _emit(as_json, view, lambda: [f"{k}: {v}" for k, v in view.items()])


@clients.command("delete")
@click.argument("client_id")
@json_option
@guarded
def clients_delete(client_id: str, as_json: bool) -> None:
    """Delete a client and revoke every token it holds or derived."""
    provider = _provider()
    if not provider.storage.delete_client(client_id):
        raise RegistrationError(f"no client {client_id!r}")
    provider.revocations.revoke_client(client_id, "client deleted")
    _emit(as_json, {"client_id": client_id, "deleted": True},
          lambda: [f"{client_id} deleted; its tokens are revoked"])


@clients.command("rotate-secret")
@click.argument("client_id")
@json_option
@guarded
def clients_rotate_secret(client_id: str, as_json: bool) -> None:
    provider = _provider()
    secret = rotate_client_secret(provider.storage, provider.hasher, client_id)
    _emit(as_json, {"client_id": client_id, "client_secret": secret},
          lambda: [f"client_secret: {secret}  (shown once; store it now)"])


# connections --------------------------------------------------------------------------------


@cli.group()
def connections() -> None:
    """Vaulted upstream credentials."""


def _read_secret_file(path: str | None) -> str | None:
    if path is None:
        return None
    value = Path(path).read_text(encoding="utf-8").strip()
    if not value:
        raise RegistrationError(f"{path} is empty")
    return value


@connections.command("add")
@click.option("--subject", required=True)
@click.option("--upstream", required=True)
@click.option("--access-token-file", required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--refresh-token-file", type=click.Path(exists=True, dir_okay=False))
@click.option("--expires-in", type=click.IntRange(1, 31536000))
@click.option("--scope", help="Internal scopes, space-separated (default: all the upstream's).")
@click.option("--allow-ip", "allowed_ips", multiple=True,
              help="CIDR range the gateway accepts calls for this connection from.")
@json_option
@guarded
def connections_add(subject: str, upstream: str, access_token_file: str,
                    refresh_token_file: str | None, expires_in: int | None, scope: str | None,
                    allowed_ips: tuple[str, ...], as_json: bool) -> None:
    """Deposit an upstream credential read from files (never from the command line)."""
    from provider.connections import OPERATOR, deposit
    from provider.errors import OAuthError

    if not CLIENT_ID.match(subject):
        raise RegistrationError("a subject is 1 to 255 printable ASCII characters without spaces")
    provider = _provider()
    operator = Client(client_id=OPERATOR, auth_method="none",
                      grant_types=frozenset(), scope=(), audiences=())
    request = {"subject": subject, "upstream": upstream,
               "access_token": _read_secret_file(access_token_file),
               "refresh_token": _read_secret_file(refresh_token_file),
               "expires_in": expires_in, "scope": scope, "allowed_ips": list(allowed_ips)}
    try:
        answer = deposit(provider, operator, request)
    except OAuthError as exc:
        raise RegistrationError(exc.description or exc.error) from None
    _emit(as_json, answer, lambda: [f"{k}: {v}" for k, v in answer.items()])


@connections.command("list")
@json_option
@guarded
def connections_list(as_json: bool) -> None:
    provider = _provider()
    rows = [{"connection_id": r["connection_id"], "subject": r["subject"],
             "upstream": r["upstream"], "scope": r["scope"], "created_at": _iso(r["created_at"])}
            for r in provider.storage.list_connections()]
    _emit(as_json, rows, lambda: [
        f"{r['connection_id']}  {r['subject']}  {r['upstream']}  {r['scope']}" for r in rows])


@connections.command("delete")
@click.argument("connection_id")
@json_option
@guarded
def connections_delete(connection_id: str, as_json: bool) -> None:
    """Delete a connection's ciphertext and revoke every token derived from it."""
    from provider.connections import revoke_connection

    provider = _provider()
    if provider.storage.get_connection(connection_id) is None:
        raise RegistrationError(f"no connection {connection_id!r}")
    revoke_connection(provider, connection_id, "deleted by operator")
    _emit(as_json, {"connection_id": connection_id, "deleted": True},
          lambda: [f"{connection_id} deleted; its tokens are revoked"])


# revoke -------------------------------------------------------------------------------------


@cli.command()
@click.option("--jti")
@click.option("--subject")
@click.option("--client", "client_id")
@click.option("--connection", "connection_id")
@json_option
@guarded
def revoke(jti: str | None, subject: str | None, client_id: str | None,
           connection_id: str | None, as_json: bool) -> None:
    """Revoke a token, a subject's, a client's or a connection's tokens, and all derived
    from them."""
    chosen = [(k, v) for k, v in (("jti", jti), ("subject", subject), ("client", client_id),
                                  ("connection", connection_id)) if v]
    if len(chosen) != 1:
        raise click.UsageError("give exactly one of --jti, --subject, --client, --connection")
    kind, value = chosen[0]
    provider = _provider()
    revocations = provider.revocations
    if kind == "jti":
        tokens = provider.settings.tokens
        expires_at = int(time.time()) + tokens.max_access_token_ttl + tokens.leeway
        revocations.revoke_ids([(value, expires_at)], reason="revoked by operator")
    elif kind == "connection":
        from provider.connections import revoke_connection

        revoke_connection(provider, value, "revoked by operator")
    elif kind == "subject":
        revocations.revoke_subject(value, "revoked by operator")
    else:
        revocations.revoke_client(value, "revoked by operator")
    _emit(as_json, {"revoked": {kind: value}}, lambda: [f"revoked {kind} {value}"])


# audit --------------------------------------------------------------------------------------


def _since(value: str | None) -> float | None:
    """``--since``: an ISO-8601 date or time; without a zone it is UTC."""
    if value is None:
        return None
    try:
        moment = datetime.fromisoformat(value.strip())
    except ValueError:
        raise RegistrationError(
            f"--since must be an ISO-8601 date or time (2024-05-01T12:00:00Z), not {value!r}"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def _audit_line(event: dict[str, Any]) -> str:
    rest = [f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in event.items()
            if k not in ("time", "type") and v is not None]
    return f"{event['time']}  {event['type']}  {' '.join(rest)}"


@cli.command()
@click.option("--since", help="Only events at or after this ISO-8601 time (UTC if no zone).")
@click.option("--subject", help="Only events about this subject (their sub).")
@click.option("--limit", default=1000, show_default=True, type=click.IntRange(1, 1000000),
              help="Print at most the newest N events.")
@json_option
@guarded
def audit(since: str | None, subject: str | None, limit: int, as_json: bool) -> None:
    """Print the audit trail, oldest first (jtis and hashes, never a token or secret)."""
    from provider.audit import AuditLog

    after = _since(since)
    provider = _provider()
    events = AuditLog(provider.storage, enabled=False).query(since=after, subject=subject,
                                                             limit=limit)
    _emit(as_json, events, lambda: [_audit_line(e) for e in events])


if __name__ == "__main__":
    main()
