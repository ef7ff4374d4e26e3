"""The gunicorn worker that ``token-provider serve`` runs: gunicorn's sync worker, which closes
a connection as soon as its response is sent.

Since version 26, gunicorn ends every connection with a lingering close (RFC 9112, section
9.6): it half-closes, then reads until the client closes its end, for up to two seconds. That
protects a response when the client has sent bytes the server never read: closing a socket
with unread data sends a TCP reset, and a client may then lose the response it has not read
yet. But a sync worker serves one connection at a time, so the linger also makes it wait for
every client's round trip when there is nothing to drain (under the bench's load, 15% of a
worker's time went to that wait), and a client that reads its response and keeps the
connection open holds the worker for the whole two seconds: a client doing that once a second
keeps both workers of a two-worker instance from anybody else.

So this worker closes at once when the client has nothing more to send, as nginx does by
default: its request's body was read to the end, and no byte waits unread (the close then sends a
FIN, never a reset). It leaves gunicorn's lingering close to everything else: a body answered
before it was read (a 413), a chunked body, a pipelined request, and every error.

It also sends a response's status line and headers in the same TCP segment as the first bytes
of its body: gunicorn writes them with two ``sendall`` calls, and its sockets have Nagle's
algorithm off, so each went out alone (the exchange at 32 connections: 1.8% more requests a
second, 12 µs less server CPU a request, between two real servers, interleaved).

It overrides ``handle_request`` and reads what remains of a body through gunicorn's body
reader, both gunicorn's internals: ``setup.cfg`` admits the releases it was written against
(26, the first to linger, and 27), and ``tests/test_serving.py`` checks it through a real
server.
"""

from __future__ import annotations

import socket
import ssl
from typing import Any

from gunicorn.http.body import LengthReader
from gunicorn.workers.sync import SyncWorker as GunicornSyncWorker


class SyncWorker(GunicornSyncWorker):
    def handle_request(self, listener: Any, req: Any, client: socket.socket, addr: Any) -> None:
        # A TLS socket takes no flags: it keeps gunicorn's sends (serve configures no TLS).
        writer = client if isinstance(client, ssl.SSLSocket) else _HeadWithBody(client)
        super().handle_request(listener, req, writer, addr)
        # The response is sent (an exception, with the connection still open, skips this).
        if _body_read(req) and not _unread_bytes(client):
            client.close()  # gunicorn's own close after this finds it closed, and returns


def _body_read(req: Any) -> bool:
    """Whether the request's body (none is a body of length 0) was read to its end; a chunked
    one, or a gunicorn that reads bodies differently, counts as not read."""
    reader = getattr(getattr(req, "body", None), "reader", None)
    return isinstance(reader, LengthReader) and reader.length == 0


def _unread_bytes(client: socket.socket) -> bool:
    """Whether the client sent anything that is still waiting to be read (or we cannot tell,
    as through TLS, where the lingering close stays)."""
    try:
        return bool(client.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
    except BlockingIOError:
        return False  # nothing waiting
    except ValueError:
        return True  # a TLS socket takes no flags
    except OSError:
        return False  # reset or gone: nothing a close could spoil


class _HeadWithBody:
    """The client socket as gunicorn's response sees it, except that its first ``sendall`` (the
    status line and headers: gunicorn always writes them first) is sent with ``MSG_MORE``: the
    kernel holds them until the next send (the body's first bytes, which a streamed response
    sends at once) or the close (a response without a body), and sends both in one segment."""

    def __init__(self, sock: socket.socket):
        self._sock = sock
        self._head_sent = False

    def sendall(self, data: bytes, flags: int = 0) -> None:
        if not self._head_sent:
            self._head_sent = True
            flags |= socket.MSG_MORE
        self._sock.sendall(data, flags)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)
