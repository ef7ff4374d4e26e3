"""How `serve` ends a connection, through a real server process with one worker.

A sync worker serves one connection at a time, so whatever it waits for after a response, every
other client waits for too. The bounds below (one second) are not performance targets: gunicorn's
lingering close holds a worker for two seconds, and these tests tell the two apart.
"""

from __future__ import annotations

import json
import socket
import time

import pytest

from provider import config
from provider.service import initialize
from tests.servers import serving

pytestmark = pytest.mark.server
PATIENCE = 1.0  # seconds a client waits for its response; gunicorn's linger is 2
LIVE = b"GET /healthz?probe=live HTTP/1.1\r\nHost: provider.test\r\n\r\n"


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    directory = tmp_path_factory.mktemp("serving")
    env = {"PROVIDER_DATABASE_URL": f"sqlite:///{directory}/provider.db",
           "PROVIDER_KEYS_DIR": str(directory / "keys"), "PROVIDER_ISSUER": "http://provider.test",
           "PROVIDER_CONFIG": str(directory / "provider.toml")}
    (directory / "provider.toml").write_text("[tokens]\nmax_request_bytes = 1024\n")
    initialize(config.load(environ=env))
    with serving(env) as url:
        yield url


def connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=PATIENCE)


def read_to_end(client: socket.socket) -> bytes:
    """Everything the server sends until it closes its side (the client's side stays open)."""
    received = b""
    while chunk := client.recv(65536):
        received += chunk
    return received


def reset(client: socket.socket) -> bool:
    """Whether the server reset the connection (the error a reset leaves on the socket)."""
    return client.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) != 0


def whole(response: bytes) -> tuple[str, dict]:
    """The status line and JSON body of a response, checked against its Content-Length."""
    head, _, body = response.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    assert len(body) == int(headers["content-length"])
    return lines[0], json.loads(body)


def test_a_client_keeping_its_connection_open_does_not_hold_the_worker(url):
    held = []
    try:
        for _ in range(4):  # each a response later than the last, were the worker held
            client = connect(url)
            held.append(client)
            client.sendall(LIVE)
            assert whole(read_to_end(client))[0] == "HTTP/1.1 200 OK"
    finally:
        for client in held:
            client.close()


def test_a_response_without_a_body_is_sent_whole(url):
    # Its headers, held back to go out with the body, go out with the close instead.
    with connect(url) as client:
        client.sendall(LIVE.replace(b"GET", b"HEAD", 1))
        head = read_to_end(client)
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert head.endswith(b"\r\n\r\n")


def test_a_response_is_whole_when_the_client_sent_bytes_never_read(url):
    # A request with more after it than the server reads (it reads 8 KiB at a time): the kernel
    # still holds unread bytes when the response is sent, and closing then would send a reset
    # instead of the response. (gunicorn drains 64 KiB at most: beyond that it resets anyway.)
    with connect(url) as client:
        client.sendall(LIVE + b"x" * 40_000)
        status, body = whole(read_to_end(client))
        assert not reset(client)
    assert status == "HTTP/1.1 200 OK"
    assert body["status"] == "ok"


def test_a_refusal_sent_before_the_body_arrives_is_not_followed_by_a_reset(url):
    # The provider answers 413 from the headers alone; the body is not in yet, so nothing is
    # waiting to be read, but it will come: a closed socket would answer it with a reset, and
    # a client that has not read the response yet may lose it (Linux keeps it; not every
    # system does). The server must linger, draining the body, until the client closes.
    with connect(url) as client:
        client.sendall(b"POST /token HTTP/1.1\r\nHost: provider.test\r\n"
                       b"Content-Type: application/x-www-form-urlencoded\r\n"
                       b"Content-Length: 5000\r\n\r\n")
        time.sleep(0.3)  # the answer is sent meanwhile
        client.sendall(b"x" * 5000)
        time.sleep(0.3)  # and the body has reached the server before the client reads
        status, body = whole(read_to_end(client))
        assert not reset(client)
    assert status == "HTTP/1.1 413 REQUEST ENTITY TOO LARGE"
    assert body["error"] == "invalid_request"
