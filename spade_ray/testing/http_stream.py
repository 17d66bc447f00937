"""The HTTP/1.1 side of :class:`~spade_ray.testing.tcpproxy.FaultProxy`: it reads the client->server bytes as requests.

The proxy forwards raw TCP, but to count S3 requests by kind and to answer some of them itself (``503 SlowDown``)
it must know where each request starts and ends.  :class:`RequestStream` splits the byte stream as botocore/aiohttp
send it (keep-alive, request heads, ``Content-Length`` and chunked bodies, trailers) without changing a byte, and
falls back to passing everything through raw once something does not parse.  :class:`Request` classifies a head
as an S3 call (GET, PUT, HEAD, POST, DELETE or LIST for a path-style bucket listing), :class:`RequestCounts` is the
snapshot of those counts that the proxy hands out, and :func:`slow_down_response` is S3's throttling error.

Kept apart from the proxy so the parsing, which is pure and synchronous, can be read (and tested) without the
asyncio connection handling around it.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from email.utils import formatdate
from urllib.parse import parse_qsl, urlsplit

MAX_HEAD_BYTES = 64 * 1024
MAX_CHUNK_LINE_BYTES = 4096
#: query parameters of the S3 list calls (ListObjects(V2), ListObjectVersions, ListMultipartUploads)
LIST_PARAMS = frozenset(
    {"list-type", "prefix", "delimiter", "continuation-token", "start-after", "max-keys", "encoding-type",
     "fetch-owner", "marker", "versions", "key-marker", "version-id-marker", "uploads", "upload-id-marker"}
)


@dataclass(frozen=True)
class Request:
    """One HTTP request head as the proxy saw it."""

    method: str
    path: str
    query: tuple[tuple[str, str], ...]
    headers: dict[str, str]  # lower-case names

    @property
    def kind(self) -> str:
        """The method, except that a GET listing a bucket (or the buckets) is ``LIST``."""
        at_bucket_level = "/" not in self.path.strip("/")
        if self.method == "GET" and at_bucket_level and {k for k, _ in self.query} <= LIST_PARAMS:
            return "LIST"
        return self.method


def parse_request_head(head: bytes) -> Request:
    """Parse ``METHOD target HTTP/1.x`` and the header lines; ValueError if it is not an HTTP request."""
    lines = head.decode("latin-1").split("\r\n")
    method, target, version = lines[0].split(" ")
    if not version.startswith("HTTP/1."):
        raise ValueError(f"not HTTP/1.x: {lines[0]!r}")
    headers = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    url = urlsplit(target)
    return Request(method.upper(), url.path or "/", tuple(parse_qsl(url.query, keep_blank_values=True)), headers)


class RequestStream:
    """Splits the client->server bytes into requests: ``feed`` returns segments in stream order.

    A segment is ``(part, data, request)``: ``"head"`` (the whole request head), ``"body"`` (body bytes,
    chunk framing included), ``"end"`` (the request is complete; no data) or ``"raw"`` (the stream could not
    be parsed; from then on everything is raw).  Concatenating the data of all segments gives the input.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._state = "head"
        self._left = 0  # bytes left in a Content-Length body or in a chunk (with its CRLF)
        self._request: Request | None = None

    def feed(self, data: bytes) -> list[tuple[str, bytes, Request | None]]:
        self._buf += data
        out: list[tuple[str, bytes, Request | None]] = []
        while self._buf and self._step(out):  # every step consumes bytes or returns False
            pass
        return out

    def _take(self, n: int) -> bytes:
        data = bytes(self._buf[:n])
        del self._buf[:n]
        return data

    def _step(self, out: list) -> bool:
        state, req = self._state, self._request
        if state == "raw":
            out.append(("raw", self._take(len(self._buf)), None))
            return False
        if state == "head":
            end = self._buf.find(b"\r\n\r\n")
            if end < 0:
                return self._overlong(MAX_HEAD_BYTES, out)
            head = self._take(end + 4)
            try:
                req = self._request = parse_request_head(head)
                length = int(req.headers.get("content-length", "0") or 0)
            except ValueError:
                out.append(("raw", head, None))
                self._state = "raw"
                return True
            out.append(("head", head, req))
            if "chunked" in req.headers.get("transfer-encoding", "").lower():
                self._state = "chunk-size"
            elif length > 0:
                self._state, self._left = "body", length
            else:
                out.append(("end", b"", req))
            return True
        if state in ("body", "chunk-data"):
            data = self._take(min(self._left, len(self._buf)))
            self._left -= len(data)
            out.append(("body", data, req))
            if self._left == 0:
                if state == "body":
                    out.append(("end", b"", req))
                    self._state = "head"
                else:
                    self._state = "chunk-size"
            return True
        # chunk-size or trailers: one CRLF-terminated line
        eol = self._buf.find(b"\r\n")
        if eol < 0:
            return self._overlong(MAX_CHUNK_LINE_BYTES, out)
        line = self._take(eol + 2)
        out.append(("body", line, req))
        if state == "chunk-size":
            try:
                size = int(line.split(b";")[0].strip(), 16)
            except ValueError:
                self._state = "raw"
                return True
            self._state, self._left = ("trailers", 0) if size == 0 else ("chunk-data", size + 2)
        elif line == b"\r\n":  # the empty line that ends the trailers ends the request
            out.append(("end", b"", req))
            self._state = "head"
        return True

    def _overlong(self, limit: int, out: list) -> bool:
        if len(self._buf) > limit:
            self._state = "raw"
            return True
        return False


@dataclass(frozen=True)
class RequestCounts:
    """A snapshot of what the proxy saw since the last :meth:`FaultProxy.reset_counts`."""

    by_kind: dict[str, int] = field(default_factory=dict)
    by_path: dict[str, dict[str, int]] = field(default_factory=dict)  # path -> kind -> count
    throttled: int = 0  # requests answered 503 SlowDown by the proxy (also in by_kind)
    dropped: int = 0  # responses cut mid-stream
    reset: int = 0  # connections reset because the store was down (open ones and new ones)
    connections: int = 0  # connections accepted

    @property
    def total(self) -> int:
        return sum(self.by_kind.values())


def slow_down_response(request: Request) -> bytes:
    """S3's ``503 SlowDown`` error, as S3 sends it, closing the connection."""
    request_id = uuid.uuid4().hex[:16].upper()
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        "<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message>"
        f"<Resource>{request.path}</Resource><RequestId>{request_id}</RequestId></Error>"
    ).encode()
    head = (
        "HTTP/1.1 503 Slow Down\r\n"
        f"Date: {formatdate(usegmt=True)}\r\n"
        "Server: spade-ray-FaultProxy\r\n"
        f"x-amz-request-id: {request_id}\r\n"
        "Content-Type: application/xml\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    return head if request.method == "HEAD" else head + body
