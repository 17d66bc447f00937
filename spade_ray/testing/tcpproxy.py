"""A fault-injecting TCP proxy on 127.0.0.1, for measuring what a slow or failing object store costs.

Put it between a client and the local S3 server (:mod:`spade_ray.testing.s3server`) and point the
client's ``endpoint_url`` at :attr:`FaultProxy.endpoint_url`.  Behaviour is adjustable while traffic
flows, from any thread:

``latency_ms``
    every chunk forwarded, each way, is held this long (a delay line: it adds latency, not a
    bandwidth cap; a request/response exchange pays it at least twice).
``set_down(True/False)``, ``outage(seconds)``
    the store goes away: open connections are reset and new ones are accepted and reset at once.
``drop_next(n)``, ``drop_probability``
    the response to the next ``n`` requests (or to each request with that probability) is cut after
    half of its first chunk and the connection closed: a short read for the client.
``throttle(share)``
    that share of HTTP requests (spread evenly, starting with the next: 0.5 is every second one) is answered with
    S3's ``503 SlowDown`` XML error and ``Connection: close`` by the proxy; the server never sees them.
``counts()``, ``reset_counts()``
    requests seen client->server, by kind (GET, PUT, HEAD, POST, DELETE, LIST) and by path.

The request stream is parsed as HTTP/1.1 (keep-alive, ``Content-Length`` and chunked bodies), as
botocore/aiohttp send it; S3 requests are expected path-style (``/bucket/key``), which is what
botocore uses for an IP endpoint.  Anything unparseable is forwarded untouched and no longer counted.
That parsing lives in :mod:`spade_ray.testing.http_stream`; this module is the proxy around it.

One daemon thread runs an asyncio loop that serves every connection; :meth:`FaultProxy.close` stops
it and joins the thread.  Loopback only, for tests and benchmarks.
"""

from __future__ import annotations

import asyncio
import ipaddress
import random
import socket
import struct
import threading
import time
from collections import Counter
from typing import Any
from urllib.parse import urlsplit

from spade_ray.testing.http_stream import Request, RequestCounts, RequestStream, slow_down_response

HOST = "127.0.0.1"
CHUNK_BYTES = 64 * 1024
#: chunks waiting in one direction's delay line before the reader waits (backpressure)
QUEUE_CHUNKS = 32
CONNECT_TIMEOUT_S = 5.0
CLOSE_TIMEOUT_S = 10.0


# ---------------------------------------------------------------------------------------------- connections

_CLOSE = object()  # sentinel in a delay line: flush, then close the connection gracefully


class _Connection:
    """One client connection and its upstream one: two readers and two delay lines."""

    def __init__(self, proxy: FaultProxy, client: tuple, server: tuple) -> None:
        self.proxy = proxy
        self.client_reader, self.client_writer = client
        self.server_reader, self.server_writer = server
        self.to_server: asyncio.Queue = asyncio.Queue(QUEUE_CHUNKS)
        self.to_client: asyncio.Queue = asyncio.Queue(QUEUE_CHUNKS)
        self.cut_next_response = False
        self.tasks: list[asyncio.Task] = []
        self.closed = False

    async def run(self) -> None:
        self.tasks = [
            asyncio.ensure_future(self._client_to_server()),
            asyncio.ensure_future(self._server_to_client()),
            asyncio.ensure_future(self._deliver(self.to_server, self.server_writer)),
            asyncio.ensure_future(self._deliver(self.to_client, self.client_writer)),
        ]
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self.close(reset=False)

    async def _client_to_server(self) -> None:
        stream = RequestStream()
        discarding = False  # the current request was answered by the proxy: do not forward its body
        try:
            while data := await self.client_reader.read(CHUNK_BYTES):
                for part, chunk, request in stream.feed(data):
                    if part == "head":
                        assert request is not None
                        if self.proxy._on_request(request, self):
                            discarding = True
                            if "100-continue" in request.headers.get("expect", "").lower():
                                return await self._answer(request)  # the client waits before sending a body
                            continue
                    elif part == "end" and discarding:
                        return await self._answer(request)
                    if chunk and not discarding:
                        await self.to_server.put((time.monotonic(), chunk))
        except (ConnectionError, OSError):
            pass
        await self.to_server.put(_CLOSE)

    async def _answer(self, request: Request | None) -> None:
        assert request is not None
        await self.to_client.put((time.monotonic(), slow_down_response(request)))
        await self.to_client.put(_CLOSE)

    async def _server_to_client(self) -> None:
        try:
            while data := await self.server_reader.read(CHUNK_BYTES):
                if self.cut_next_response:
                    self.proxy._count("dropped")
                    await self.to_client.put((time.monotonic(), data[: len(data) // 2]))
                    break
                await self.to_client.put((time.monotonic(), data))
        except (ConnectionError, OSError):
            pass
        await self.to_client.put(_CLOSE)

    async def _deliver(self, queue: asyncio.Queue, writer: asyncio.StreamWriter) -> None:
        """The delay line: write each chunk ``latency_ms`` after it was read; on _CLOSE close everything."""
        while (item := await queue.get()) is not _CLOSE:
            received, data = item
            wait = received + self.proxy.latency_ms / 1000.0 - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            writer.write(data)
            await writer.drain()
        self.close(reset=False)

    def close(self, reset: bool) -> None:
        """Close both sides; ``reset`` sends RST (the store vanished) instead of FIN."""
        if self.closed:
            return
        self.closed = True
        for writer in (self.client_writer, self.server_writer):
            _close_writer(writer, reset)
        current = asyncio.current_task()
        for task in self.tasks:
            if task is not current:
                task.cancel()
        self.proxy._connections.discard(self)


def _close_writer(writer: asyncio.StreamWriter, reset: bool) -> None:
    if reset:
        sock = writer.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass
        writer.transport.abort()
    else:
        writer.close()


def _loopback_address(url_or_hostport: str) -> tuple[str, int]:
    """``(host, port)`` of ``http://127.0.0.1:8333`` or ``127.0.0.1:8333``; ValueError unless loopback."""
    url = urlsplit(url_or_hostport if "://" in url_or_hostport else f"tcp://{url_or_hostport}")
    host, port = url.hostname or "", url.port
    if port is None:
        raise ValueError(f"no port in upstream address {url_or_hostport!r}")
    if host != "localhost" and not ipaddress.ip_address(host).is_loopback:
        raise ValueError(f"FaultProxy forwards only to loopback addresses, not {host!r}")
    return host, port


# -------------------------------------------------------------------------------------------------- proxy


class FaultProxy:
    """A TCP proxy on 127.0.0.1 in front of ``upstream`` (a loopback URL) that injects faults on demand.

    ``with FaultProxy(server.endpoint_url, latency_ms=20) as proxy:`` then use ``proxy.endpoint_url``.
    """

    def __init__(
        self,
        upstream: str,
        *,
        latency_ms: float = 0.0,
        drop_probability: float = 0.0,
        seed: int = 0,
        max_connections: int = 256,
        port: int = 0,
    ) -> None:
        self.upstream = _loopback_address(upstream)
        self.latency_ms = latency_ms
        self.drop_probability = drop_probability
        self.max_connections = max_connections
        self._requested_port = port
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        self._down = False
        self._down_until = 0.0
        self._drops_left = 0
        self._throttle_share = 0.0
        self._throttle_credit = 0.0
        self._kinds: Counter[str] = Counter()
        self._paths: dict[str, Counter[str]] = {}
        self._events: Counter[str] = Counter()
        self._connections: set[_Connection] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.AbstractServer | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> FaultProxy:
        """Listen on 127.0.0.1 (``port``, or a free one) and serve from a daemon thread."""
        if self._thread is not None:
            raise RuntimeError("FaultProxy already started")
        ready = threading.Event()
        failure: list[BaseException] = []

        def serve() -> None:
            loop = self._loop = asyncio.new_event_loop()
            try:
                self._server = loop.run_until_complete(
                    asyncio.start_server(self._accept, HOST, self._requested_port, limit=CHUNK_BYTES, backlog=128)
                )
                self.port = self._server.sockets[0].getsockname()[1]
            except BaseException as e:  # reported to start()'s caller
                failure.append(e)
                loop.close()
                return
            finally:
                ready.set()
            try:
                loop.run_forever()
            finally:
                loop.close()

        self._thread = threading.Thread(target=serve, name=f"FaultProxy->{self.upstream[1]}", daemon=True)
        self._thread.start()
        ready.wait(CLOSE_TIMEOUT_S)
        if failure:
            self._thread.join(CLOSE_TIMEOUT_S)
            self._thread = None
            raise failure[0]
        return self

    def close(self) -> None:
        """Stop listening, close every connection, stop the loop and join the thread."""
        thread, loop = self._thread, self._loop
        if thread is None or loop is None:
            return
        if loop.is_running():
            try:
                asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(CLOSE_TIMEOUT_S)
            finally:
                loop.call_soon_threadsafe(loop.stop)
        thread.join(CLOSE_TIMEOUT_S)
        if thread.is_alive():
            raise RuntimeError("FaultProxy thread did not stop")
        self._thread = self._loop = None

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def endpoint_url(self) -> str:
        """``http://127.0.0.1:<port>``: give this to the client instead of the server's URL."""
        if not self.port:
            raise RuntimeError("FaultProxy not started")
        return f"http://{HOST}:{self.port}"

    # ------------------------------------------------------------------ faults

    @property
    def is_down(self) -> bool:
        return self._down or time.monotonic() < self._down_until

    def set_down(self, down: bool) -> None:
        """Take the store away (open connections reset, new ones reset on arrival) or bring it back."""
        with self._lock:
            self._down = down
            self._down_until = 0.0
        if down:
            self._reset_all()

    def outage(self, seconds: float) -> None:
        """Be down for the next ``seconds`` (returns at once); the store comes back by itself."""
        with self._lock:
            self._down_until = time.monotonic() + seconds
        self._reset_all()

    def drop_next(self, n: int = 1) -> None:
        """Cut the responses to the next ``n`` requests mid-stream (half of the first chunk, then close)."""
        with self._lock:
            self._drops_left += n

    def throttle(self, share: float) -> None:
        """Answer ``share`` (0..1) of the requests with ``503 SlowDown``, spread evenly from the next one; 0 stops it."""
        if not 0.0 <= share <= 1.0:
            raise ValueError(f"throttle share must be in [0, 1], not {share}")
        with self._lock:
            self._throttle_share = share
            self._throttle_credit = 1.0 - share  # the next request is the first one throttled

    # ------------------------------------------------------------------ counts

    def counts(self) -> RequestCounts:
        with self._lock:
            return RequestCounts(
                by_kind=dict(self._kinds),
                by_path={path: dict(kinds) for path, kinds in self._paths.items()},
                throttled=self._events["throttled"],
                dropped=self._events["dropped"],
                reset=self._events["reset"],
                connections=self._events["connections"],
            )

    def reset_counts(self) -> None:
        with self._lock:
            self._kinds.clear()
            self._paths.clear()
            self._events.clear()

    # ------------------------------------------------------------------ inside the loop thread

    def _count(self, event: str) -> None:
        with self._lock:
            self._events[event] += 1

    def _on_request(self, request: Request, connection: _Connection) -> bool:
        """Count a request head and decide its fate: True when the proxy answers it with 503 itself."""
        with self._lock:
            self._kinds[request.kind] += 1
            self._paths.setdefault(request.path, Counter())[request.kind] += 1
            self._throttle_credit += self._throttle_share
            if self._throttle_share > 0 and self._throttle_credit >= 1.0 - 1e-9:
                self._throttle_credit -= 1.0
                self._events["throttled"] += 1
                return True
            if self._drops_left > 0:
                self._drops_left -= 1
                connection.cut_next_response = True
            elif self.drop_probability > 0 and self._random.random() < self.drop_probability:
                connection.cut_next_response = True
        return False

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._count("connections")
        if self.is_down or len(self._connections) >= self.max_connections:
            self._count("reset")
            _close_writer(writer, reset=True)
            return
        try:
            upstream = await asyncio.wait_for(asyncio.open_connection(*self.upstream, limit=CHUNK_BYTES),
                                              CONNECT_TIMEOUT_S)
        except (OSError, asyncio.TimeoutError):
            _close_writer(writer, reset=True)  # the server itself is unreachable: pass that on
            return
        connection = _Connection(self, (reader, writer), upstream)
        self._connections.add(connection)
        await connection.run()

    def _reset_all(self) -> None:
        loop = self._loop
        if loop is not None and loop.is_running():
            loop.call_soon_threadsafe(self._reset_connections)

    def _reset_connections(self, count: bool = True) -> None:
        for connection in list(self._connections):
            if count:
                self._count("reset")
            connection.close(reset=True)

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        self._reset_connections(count=False)
        # connection handlers end by themselves once their connection is closed; cancelling them instead
        # makes asyncio's stream callback log the CancelledError (Python 3.11)
        pending = {t for t in asyncio.all_tasks() if t is not asyncio.current_task()}
        if pending:
            _, stuck = await asyncio.wait(pending, timeout=CONNECT_TIMEOUT_S + 1)
            for task in stuck:
                task.cancel()
            await asyncio.gather(*stuck, return_exceptions=True)
