"""Prometheus metrics: the text format, the /metrics blueprint, and gunicorn's several processes
counted as one (PROMETHEUS_MULTIPROC_DIR)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from flask import Flask
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from provider import metrics
from provider.views.metrics import bp

REPO = Path(__file__).resolve().parent.parent


def samples(body: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_counters_and_histograms_render_in_prometheus_text_format():
    before = value("provider_requests_total", endpoint="token", outcome="invalid_grant")
    metrics.REQUESTS.labels("token", "invalid_grant").inc()
    metrics.TOKENS_ISSUED.labels("client_credentials").inc(2)
    metrics.TOKENS_EXCHANGED.inc()
    metrics.REFUSALS.labels("gateway", "insufficient_scope").inc()
    metrics.REVOCATIONS.labels("subject").inc()
    metrics.RATE_LIMIT_HITS.labels("token").inc()
    metrics.SUSPENSIONS.labels("family").inc()
    metrics.GATEWAY_UPSTREAM_SECONDS.labels("drive").observe(0.03)

    body, content_type = metrics.render()
    assert content_type == CONTENT_TYPE_LATEST and content_type.startswith("text/plain")
    text = body.decode()
    assert "# TYPE provider_requests_total counter" in text
    assert "# TYPE provider_gateway_upstream_seconds histogram" in text
    found = samples(body)
    assert found[("provider_requests_total", (("endpoint", "token"),
                                              ("outcome", "invalid_grant")))] == before + 1
    for name in ("provider_tokens_issued_total", "provider_token_exchanges_total",
                 "provider_refusals_total", "provider_revocations_total",
                 "provider_rate_limit_hits_total", "provider_suspensions_total"):
        assert any(key[0] == name for key in found), name
    assert found[("provider_gateway_upstream_seconds_bucket",
                  (("le", "0.05"), ("upstream", "drive")))] >= 1
    assert ("provider_gateway_upstream_seconds_bucket",
            (("le", "30.0"), ("upstream", "drive"))) in found


def test_metrics_blueprint_serves_the_rendered_text():
    app = Flask(__name__)
    app.register_blueprint(bp)
    metrics.TOKENS_EXCHANGED.inc()
    response = app.test_client().get("/metrics")
    assert response.status_code == 200
    assert response.headers["Content-Type"] == CONTENT_TYPE_LATEST
    assert response.headers["Cache-Control"] == "no-store"
    found = samples(response.data)
    assert found[("provider_token_exchanges_total", ())] == value("provider_token_exchanges_total")
    assert app.test_client().post("/metrics").status_code == 405


COUNT = """
import sys
from provider import metrics
metrics.TOKENS_ISSUED.labels("client_credentials").inc(int(sys.argv[1]))
metrics.REQUESTS.labels("token", "ok").inc(int(sys.argv[1]))
metrics.GATEWAY_UPSTREAM_SECONDS.labels("drive").observe(0.2)
"""

RENDER = """
import sys
from provider import metrics
sys.stdout.buffer.write(metrics.render()[0])
"""


def test_multiprocess_mode_adds_up_every_process(tmp_path):
    environment = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    for count in ("2", "3"):
        subprocess.run([sys.executable, "-c", COUNT, count], env=environment, cwd=REPO,
                       check=True, timeout=60)
    assert len(list(tmp_path.glob("*.db"))) >= 2  # one value file per process

    rendered = subprocess.run([sys.executable, "-c", RENDER], env=environment, cwd=REPO,
                              check=True, timeout=60, capture_output=True).stdout
    found = samples(rendered)
    assert found[("provider_tokens_issued_total", (("grant_type", "client_credentials"),))] == 5
    assert found[("provider_requests_total", (("endpoint", "token"), ("outcome", "ok")))] == 5
    assert found[("provider_gateway_upstream_seconds_count", (("upstream", "drive"),))] == 2



COUNT_ACROSS_FORK = """
import os
from provider import metrics
metrics.count(metrics.REQUESTS, "token", "ok")  # the series is found here, before the fork
pid = os.fork()
if pid == 0:
    metrics.count(metrics.REQUESTS, "token", "ok")
    metrics.count(metrics.REQUESTS, "token", "ok")
    os._exit(0)
os.waitpid(pid, 0)
metrics.count(metrics.REQUESTS, "token", "ok")
"""


def test_a_series_found_before_a_fork_counts_in_each_process_once(tmp_path):
    """gunicorn forks its workers from a parent that has served nothing; a series looked up
    once must still count each worker's requests in that worker's file, and never twice."""
    environment = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    subprocess.run([sys.executable, "-c", COUNT_ACROSS_FORK], env=environment, cwd=REPO,
                   check=True, timeout=60)
    assert len(list(tmp_path.glob("counter_*.db"))) == 2
    rendered = subprocess.run([sys.executable, "-c", RENDER], env=environment, cwd=REPO,
                              check=True, timeout=60, capture_output=True).stdout
    assert samples(rendered)[("provider_requests_total",
                              (("endpoint", "token"), ("outcome", "ok")))] == 4


def test_a_directory_set_after_import_serves_this_process_and_says_so(tmp_path, monkeypatch,
                                                                      caplog):
    """This process imported prometheus_client without the variable: its values are in memory,
    and aggregating the (empty) directory would show nothing."""
    metrics.TOKENS_ISSUED.labels("refresh_token").inc()
    expected = value("provider_tokens_issued_total", grant_type="refresh_token")
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    monkeypatch.setattr(metrics, "_warned_late_directory", False)
    found = samples(metrics.render()[0])
    assert found[("provider_tokens_issued_total", (("grant_type", "refresh_token"),))] == expected
    assert "set after prometheus_client was imported" in caplog.text
