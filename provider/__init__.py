"""token-provider: an internal OAuth 2.0 token provider.

``create_app(test_config=None)`` builds the Flask application: defaults, then the config file,
then ``PROVIDER_*`` environment, then ``test_config``; then validation, which fails fast with
the setting's name (:class:`provider.config.ConfigError`).
"""

from __future__ import annotations

import logging
from typing import Any

from flask import Flask

from provider import config

__all__ = ["create_app"]


def create_app(test_config: dict[str, Any] | None = None) -> Flask:
    # Imported here, not above: importing them imports prometheus_client, which must come after
    # `token-provider serve` has set PROMETHEUS_MULTIPROC_DIR.
    from provider import errors, views
    from provider.service import Provider

    settings = config.load(overrides=test_config)
    app = Flask(__name__, static_folder=None)
    app.config["MAX_CONTENT_LENGTH"] = settings.tokens.max_request_bytes
    # Werkzeug would answer "//" in a path with an HTML redirect to a merged path; the gateway
    # refuses such paths itself.
    app.url_map.merge_slashes = False
    app.json.sort_keys = False
    provider = Provider(settings)
    provider.start()
    app.extensions["provider"] = provider
    app.extensions["settings"] = settings
    errors.init_app(app)
    views.register(app)
    logging.getLogger("provider").setLevel(logging.INFO)
    return app
