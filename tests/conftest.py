"""Fixtures: a fresh provider per test (its own keys and database).

Tests marked with :data:`on_every_backend` run on SQLite and, when
``PROVIDER_TEST_DATABASE_URL`` is set, on PostgreSQL too (a schema of their own). Redis-backed
variants run when ``PROVIDER_TEST_REDIS_URL`` is set. When those are set and the service is
down, the tests fail: they never skip.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import sqlalchemy as sa

from provider import config, create_app
from provider.service import initialize
from provider.vault import Vault
from tests.servers import Webhook
from tests.support import ISSUER, OAuth
from tests.upstream import FakeUpstream

PG_URL = os.environ.get("PROVIDER_TEST_DATABASE_URL")
REDIS_URL = os.environ.get("PROVIDER_TEST_REDIS_URL")
BACKENDS = ["sqlite"] + (["postgresql"] if PG_URL else [])


@pytest.fixture(autouse=True)
def _isolated_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    """No test reads the developer's config, keys or PROVIDER_* settings."""
    for name in list(os.environ):
        if name.startswith("PROVIDER_") and not name.startswith("PROVIDER_TEST_"):
            monkeypatch.delenv(name)
    config_file = tmp_path / "provider.toml"
    config_file.write_text("")
    monkeypatch.setenv("PROVIDER_CONFIG", str(config_file))


def postgres_schema() -> Iterator[str]:
    """A PostgreSQL URL whose search_path is a new, empty schema; dropped afterwards."""
    assert PG_URL, "PROVIDER_TEST_DATABASE_URL is not set"
    schema = "t_" + secrets.token_hex(6)
    admin = sa.create_engine(PG_URL)
    with admin.begin() as connection:
        connection.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    url = sa.engine.make_url(PG_URL).update_query_dict({"options": f"-csearch_path={schema}"})
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.begin() as connection:
            connection.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture
def backend(request: pytest.FixtureRequest) -> str:
    return getattr(request, "param", "sqlite")


@pytest.fixture
def database_url(backend: str, tmp_path: Any) -> Iterator[str]:
    if backend == "postgresql":
        yield from postgres_schema()
    else:
        yield f"sqlite:///{tmp_path}/provider.db"


@pytest.fixture
def settings_overrides() -> dict[str, Any]:
    """Override in a test module to change settings for its app."""
    return {}


@pytest.fixture(scope="session")
def vault_keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One vault key pair for the session: RSA-3072 generation takes up to a second."""
    directory = tmp_path_factory.mktemp("vault-template")
    Vault.create(str(directory))
    return directory / "vault"


@pytest.fixture
def env(tmp_path: Any, monkeypatch: pytest.MonkeyPatch, vault_keys: Path) -> dict[str, str]:
    """A provider instance for the command line, in ``tmp_path``, named by PROVIDER_* variables
    (the vault keys copied in: RSA-3072 generation is slow)."""
    shutil.copytree(vault_keys, tmp_path / "keys" / "vault")
    values = {
        "PROVIDER_CONFIG": str(tmp_path / "instance" / "provider.toml"),
        "PROVIDER_DATABASE_URL": f"sqlite:///{tmp_path}/instance/provider.db",
        "PROVIDER_KEYS_DIR": str(tmp_path / "keys"),
        "PROVIDER_ISSUER": "http://localhost",
    }
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    return values


@pytest.fixture
def app_config(database_url: str, tmp_path: Any, settings_overrides: dict[str, Any],
               vault_keys: Path) -> dict[str, Any]:
    shutil.copytree(vault_keys, tmp_path / "keys" / "vault")
    overrides = {"issuer": ISSUER, "database_url": database_url,
                 "keys_dir": str(tmp_path / "keys"), **settings_overrides}
    if REDIS_URL and overrides.get("redis_url") == REDIS_URL:
        # Every test's provider has the same issuer, hence the same Redis keys: start empty,
        # or an earlier test's failed logins (10 a minute from 127.0.0.1) refuse this one's.
        redis.Redis.from_url(overrides["redis_url"]).flushdb()
    initialize(config.load(overrides=overrides))
    return overrides


@pytest.fixture
def app(app_config: dict[str, Any]) -> Iterator[Any]:
    application = create_app(app_config)
    application.config["TESTING"] = True
    yield application
    provider = application.extensions["provider"]
    provider.audit.close()  # its events, written before a PostgreSQL test schema is dropped
    provider.storage.engine.dispose()


@pytest.fixture
def oauth(app: Any, client: Any) -> OAuth:
    return OAuth(app, client)


on_every_backend = pytest.mark.parametrize("backend", BACKENDS, indirect=True)


@pytest.fixture(name="upstream")
def upstream_fixture() -> Iterator[FakeUpstream]:
    """A running :class:`tests.upstream.FakeUpstream`, stopped after the test."""
    with FakeUpstream().start() as fake:
        yield fake


@pytest.fixture
def webhook() -> Iterator[Webhook]:
    hook = Webhook()
    hook.thread.start()
    try:
        yield hook
    finally:
        hook.release.set()
        hook.server.shutdown()
        hook.server.server_close()
