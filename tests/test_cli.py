"""The token-provider command line: JSON output, secrets shown once, operator revocation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from provider import create_app
from provider.cli import cli
from tests.support import OAuth, Registered


def run(*args: str) -> dict | list:
    """Invoke with --json (placed before a "--" that ends the options)."""
    arguments = list(args)
    arguments.insert(arguments.index("--") if "--" in arguments else len(arguments), "--json")
    result = CliRunner().invoke(cli, arguments, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.fixture
def initialized(env):
    run("init")
    return env


@pytest.fixture
def served(initialized):
    application = create_app()
    yield OAuth(application, application.test_client())
    application.extensions["provider"].storage.engine.dispose()


def test_init_creates_config_keys_and_database_and_is_idempotent(env):
    first = run("init")
    assert first["config_created"] and first["signing_key_created"]
    config_text = Path(env["PROVIDER_CONFIG"]).read_text()
    assert "[tokens]" in config_text and "leeway = 30" in config_text
    second = run("init")
    assert not second["config_created"] and not second["signing_key_created"]
    assert len(run("keys", "list")["keys"]) == 1


def test_clients_create_prints_the_secret_once(initialized, served):
    created = run("clients", "create", "svc", "--grant-type", "client_credentials",
                  "--scope", "read write", "--audience", "https://api.example")
    assert set(created) == {"client_id", "client_secret"}
    secret = created["client_secret"]
    assert len(secret) >= 43
    shown = run("clients", "show", "svc")
    listed = run("clients", "list")
    for document in (shown, listed):
        assert secret not in json.dumps(document)
        assert "secret_hash" not in json.dumps(document)
    assert shown["scope"] == "read write" and shown["audiences"] == ["https://api.example"]
    assert served.token(Registered("svc", secret)).status_code == 200


def test_private_key_jwt_client_gets_no_secret(initialized, tmp_path):
    from cryptography.hazmat.primitives.asymmetric import ec
    from jwt.algorithms import ECAlgorithm

    jwk = ECAlgorithm.to_jwk(ec.generate_private_key(ec.SECP256R1()).public_key(), as_dict=True)
    jwks_file = tmp_path / "jwks.json"
    jwks_file.write_text(json.dumps({"keys": [jwk]}))
    created = run("clients", "create", "svc", "--grant-type", "client_credentials", "--scope", "x",
                  "--auth-method", "private_key_jwt", "--jwks-file", str(jwks_file))
    assert created == {"client_id": "svc"}


def test_rotate_secret_replaces_the_old_secret(initialized, served):
    old = run("clients", "create", "svc", "--grant-type", "client_credentials", "--scope", "x")
    new = run("clients", "rotate-secret", "svc")
    assert new["client_secret"] != old["client_secret"]
    served.provider.clients.forget("svc")
    assert served.token(Registered("svc", old["client_secret"])).status_code == 401
    assert served.token(Registered("svc", new["client_secret"])).status_code == 200


def test_deleting_a_client_revokes_its_tokens(initialized, served):
    created = run("clients", "create", "svc", "--grant-type", "client_credentials", "--scope", "x")
    svc = Registered("svc", created["client_secret"])
    token = served.access_token(svc)
    assert run("clients", "delete", "svc")["deleted"]
    served.provider.revocations.sync(force=True)
    served.provider.clients.forget("svc")
    assert not served.active(token)
    assert served.token(svc).status_code == 401


@pytest.mark.parametrize("option", ["--jti", "--subject", "--client"])
def test_operator_revocation_cascades(initialized, served, option):
    created = run("clients", "create", "svc", "--grant-type", "client_credentials",
                  "--grant-type", "urn:ietf:params:oauth:grant-type:token-exchange", "--scope", "x")
    svc = Registered("svc", created["client_secret"])
    root = served.access_token(svc)
    child = served.exchanged(svc, root)
    value = {"--jti": served.introspect(root)["jti"], "--subject": "svc", "--client": "svc"}[option]
    assert run("revoke", option, value) == {"revoked": {option[2:]: value}}
    served.provider.revocations.sync(force=True)
    assert not served.active(root)
    assert not served.active(child)


def test_keys_rotate_and_retire_print_json(initialized):
    first = run("keys", "list")["keys"][0]
    assert set(first) >= {"kid", "alg", "state", "created_at"}
    assert first["state"] == "signing"
    rotated = run("keys", "rotate")
    assert rotated["state"] == "signing"
    states = {k["kid"]: k["state"] for k in run("keys", "list")["keys"]}
    assert states == {first["kid"]: "retiring", rotated["kid"]: "signing"}
    # A kid is base64url and may start with "-": "--" ends the options.
    refused = CliRunner().invoke(cli, ["keys", "retire", "--", first["kid"]])
    assert refused.exit_code == 1 and "may be valid" in refused.output
    refused = CliRunner().invoke(cli, ["keys", "retire", "--force", "--", rotated["kid"]])
    assert refused.exit_code == 1 and "rotate first" in refused.output
    assert run("keys", "retire", "--force", "--", first["kid"])["state"] == "retired"


def test_refused_registration_is_one_line_and_status_1(initialized):
    result = CliRunner().invoke(cli, ["clients", "create", "bad id", "--grant-type",
                                      "client_credentials", "--scope", "x"])
    assert result.exit_code == 1
    assert result.output.strip().startswith("error: a client id is 1 to 255")


@pytest.mark.parametrize(
    ("config_text", "message"),
    [
        ("[tokens]\nleeway = 90\n", "config error: tokens.leeway must be between 0 and 60"),
        ("[tokens]\nlee_way = 1\n", "config error: tokens.lee_way is not a setting"),
        ("[keys]\nalgorithm = \"HS256\"\n", "config error: keys.algorithm must be one of"),
        ("[rate_limits]\ntoken = \"fast\"\n", "config error: rate_limits.token must look like"),
        ("[tokens\n", "config error:"),
        ("[upstreams.drive]\nbase_url = \"https://u.example\"\n[[upstreams.drive.routes]]\n"
         "method = \"GET\"\npath = \"/files/../x\"\nscope = \"s\"\n",
         "config error: upstreams.drive.routes[0].path"),
    ],
    ids=["out-of-range", "unknown-key", "bad-algorithm", "bad-rate", "bad-toml", "bad-route"],
)
def test_bad_configuration_fails_at_start_with_one_line_and_status_2(env, config_text, message):
    run("init")
    Path(env["PROVIDER_CONFIG"]).write_text(config_text)
    result = subprocess.run(
        [sys.executable, "-m", "provider", "serve", "--port", "1"],
        capture_output=True, text=True, timeout=60, env={**os.environ, **env},
    )
    assert result.returncode == 2
    assert result.stderr.startswith(message), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr


def test_bad_environment_override_names_the_setting(env):
    run("init")
    result = subprocess.run(
        [sys.executable, "-m", "provider", "keys", "list"], capture_output=True, text=True,
        timeout=60, env={**os.environ, **env, "PROVIDER_ROLE": "root"},
    )
    assert result.returncode == 2
    assert result.stderr.strip() == "config error: role must be one of all, web, gateway"


def test_serving_without_init_says_to_run_init(env):
    result = subprocess.run(
        [sys.executable, "-m", "provider", "serve", "--port", "1"], capture_output=True,
        text=True, timeout=60, env={**os.environ, **env},
    )
    assert result.returncode == 2
    assert "run token-provider init" in result.stderr
    assert "Traceback" not in result.stderr


UPSTREAM_CONFIG = """
[upstreams.drive]
base_url = "https://upstream.example/api"
[[upstreams.drive.routes]]
method = "GET"
path = "/files/{id}"
scope = "files:read"
"""


@pytest.fixture
def with_upstream(env):
    run("init")
    Path(env["PROVIDER_CONFIG"]).write_text(UPSTREAM_CONFIG)
    return env


def test_connections_add_prints_the_deposit_answer_and_list_never_the_credential(with_upstream, tmp_path):
    secret_file = tmp_path / "upstream-token"
    secret_file.write_text("upstream-secret-value\n")
    added = run("connections", "add", "--subject", "alice", "--upstream", "drive",
                "--access-token-file", str(secret_file), "--expires-in", "600")
    assert set(added) == {"connection_id", "access_token", "token_type", "expires_in",
                          "refresh_token", "scope"}
    assert added["scope"] == "files:read"
    listed = run("connections", "list")
    assert listed == [{"connection_id": added["connection_id"], "subject": "alice",
                       "upstream": "drive", "scope": "files:read",
                       "created_at": listed[0]["created_at"]}]
    assert "upstream-secret-value" not in json.dumps(listed)


@pytest.mark.parametrize("how", ["revoke", "delete"])
def test_revoking_or_deleting_a_connection_revokes_its_tokens(with_upstream, tmp_path, how):
    secret_file = tmp_path / "upstream-token"
    secret_file.write_text("upstream-secret-value")
    added = run("connections", "add", "--subject", "alice", "--upstream", "drive",
                "--access-token-file", str(secret_file))
    application = create_app()
    try:
        served = OAuth(application, application.test_client())
        assert served.active(added["access_token"])
        if how == "revoke":
            run("revoke", "--connection", added["connection_id"])
        else:
            run("connections", "delete", added["connection_id"])
        served.provider.revocations.sync(force=True)
        assert not served.active(added["access_token"])
        assert run("connections", "list") == []
    finally:
        application.extensions["provider"].storage.engine.dispose()


def test_connections_add_keeps_the_allowlist(with_upstream, tmp_path):
    secret_file = tmp_path / "t"
    secret_file.write_text("x")
    run("connections", "add", "--subject", "a", "--upstream", "drive", "--access-token-file",
        str(secret_file), "--allow-ip", "10.0.0.0/8")
    application = create_app()
    try:
        (row,) = application.extensions["provider"].storage.list_connections()
        assert row["allowed_ips"] == ["10.0.0.0/8"]
    finally:
        application.extensions["provider"].storage.engine.dispose()


def test_connections_add_for_an_unknown_upstream_is_refused(with_upstream, tmp_path):
    secret_file = tmp_path / "t"
    secret_file.write_text("x")
    result = CliRunner().invoke(cli, ["connections", "add", "--subject", "a", "--upstream", "nope",
                                      "--access-token-file", str(secret_file)])
    assert result.exit_code == 1 and result.output.strip() == "error: no such upstream"


def test_ids_never_start_with_a_dash_so_the_cli_never_reads_one_as_an_option(monkeypatch):
    from provider import tokens

    drawn = iter(["-pZ3", "-x", "Kq-_"])
    monkeypatch.setattr(tokens.secrets, "token_urlsafe", lambda nbytes: next(drawn))
    assert tokens.new_id() == "Kq-_"
