"""One HTTP/1.1 client connection: send a request, read the answer's head and body.

It does only what a JSON API client needs: a request with a body, an answer framed by
`Content-Length`, by chunked transfer coding, or by the end of the connection (RFC 9112,
section 6.3), interim `1xx` answers skipped, keep-alive when both sides allow it. Header
names are lower-cased and repeated headers joined with ", ". Through an HTTP proxy, an
https server is reached through a CONNECT tunnel (RFC 9110, section 9.3.6); for an http
server the caller sends its requests to the proxy in absolute form.

It exists because the runtime pays its CPU on every model call, and the standard library's
`http.client` parses each answer's headers with the `email` package: against a loopback
server a request costs about 0.16 ms of CPU there and 0.07 ms here.

Errors: `TimeoutError` when the socket timeout passes, `OSError` (`ConnectionError` for
a connection the server closed) when the connection fails, `ProtocolError` when the bytes
received are not HTTP/1.x, `TunnelRefused` when a proxy would not open the tunnel.

Example:
    >>> connection = Connection("127.0.0.1", 8000, timeout_s=30)
    >>> head = request_head("POST", "/v1/chat/completions", "127.0.0.1:8000", {}, len(body))
    >>> connection.send(head, body)
    >>> data = connection.answer().read()
"""

from __future__ import annotations

import base64
import socket
import ssl
import string
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from io import BufferedReader
from urllib.parse import unquote, urlsplit

MAX_LINE_BYTES = 65_536
MAX_HEADERS = 200
_READ_BYTES = 65_536
_NO_BODY = frozenset({204, 304})
_HEX_DIGITS = frozenset(string.hexdigits.encode())


class ProtocolError(Exception):
    """What the server sent is not an HTTP/1.x answer."""


class ServerClosed(ConnectionError):
    """The server closed the connection before it began to answer."""


class TunnelRefused(Exception):
    """The proxy answered a CONNECT with something other than 2xx."""

    def __init__(self, status: int, reason: str) -> None:
        self.status = status
        self.reason = reason
        super().__init__(f"{status} {reason}".strip())


@dataclass(frozen=True, slots=True)
class Proxy:
    """An HTTP proxy: where it listens, the Proxy-Authorization it is sent (from the user
    and password of its URL), and its URL without the password, for messages."""

    host: str
    port: int
    authorization: str | None
    shown: str

    @classmethod
    def parse(cls, url: str) -> Proxy:
        """`http://[user:password@]host[:port]` (port 80 when absent); ValueError otherwise."""
        parts = urlsplit(url if "://" in url else f"http://{url}")
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(
                f"proxy {url!r}: only http:// proxies are supported (an https server is "
                "reached through them with CONNECT), e.g. http://user:password@proxy:3128"
            )
        try:
            port = parts.port or 80
        except ValueError as error:
            raise ValueError(f"proxy {url!r}: {error}") from None
        authorization = None
        if parts.username is not None:
            pair = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
            authorization = "Basic " + base64.b64encode(pair.encode()).decode("ascii")
        shown = f"http://{parts.hostname}:{port}"
        return cls(parts.hostname, port, authorization, shown)


def request_head(
    method: str, target: str, host: str, headers: Mapping[str, str], length: int
) -> bytes:
    """The request line and headers, with `Host` and `Content-Length` added."""
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}", f"Content-Length: {length}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


class Connection:
    """A socket to one server (TLS for https), with its buffered reader."""

    __slots__ = ("_reader", "_socket")

    def __init__(
        self,
        host: str,
        port: int,
        timeout_s: float,
        tls: ssl.SSLContext | None = None,
        via: Proxy | None = None,
    ) -> None:
        """Connect to `host:port`, or to the proxy `via`: with `tls`, through a tunnel."""
        peer = (host, port) if via is None else (via.host, via.port)
        raw = socket.create_connection(peer, timeout=timeout_s)
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if via is not None and tls is not None:
                _open_tunnel(raw, authority(host, port), via)
            self._socket = raw if tls is None else tls.wrap_socket(raw, server_hostname=host)
        except BaseException:
            raw.close()
            raise
        self._reader = self._socket.makefile("rb")

    def send(self, head: bytes, body: bytes) -> None:
        self._socket.sendall(head + body)

    def answer(self) -> Answer:
        """Read the head of the next answer (skipping interim 1xx answers)."""
        first = True
        while True:
            line = self._reader.readline(MAX_LINE_BYTES + 1)
            if not line:
                if first:
                    raise ServerClosed("the server closed the connection without answering")
                raise ProtocolError("the connection ended between interim answers")
            first = False
            version, status, reason = _status_line(line)
            headers = _headers(self._reader)
            if 100 <= status < 200 and status != 101:
                continue
            return Answer(self._reader, version, status, reason, headers)

    def close(self) -> None:
        try:
            self._reader.close()
        finally:
            self._socket.close()


class Answer:
    """An answer's status and headers, and its body, read once (`read` or `lines`)."""

    __slots__ = (
        "_chunk_left",
        "_left",
        "_mode",
        "_reader",
        "done",
        "headers",
        "reason",
        "status",
        "version",
    )

    def __init__(
        self,
        reader: BufferedReader,
        version: str,
        status: int,
        reason: str,
        headers: dict[str, str],
    ) -> None:
        self._reader = reader
        self.version = version
        self.status = status
        self.reason = reason
        self.headers = headers
        self._left = 0
        self._chunk_left = 0
        self.done = False
        if status in _NO_BODY:
            self._mode, self.done = "none", True
        elif "chunked" in headers.get("transfer-encoding", "").lower():
            self._mode = "chunked"
        elif "content-length" in headers:
            self._mode, self._left = "length", _content_length(headers["content-length"])
            self.done = self._left == 0
        else:
            self._mode = "close"

    @property
    def reusable(self) -> bool:
        """Whether the connection may carry another request once this body was read."""
        if not self.done or self._mode == "close":
            return False
        tokens = {t.strip().lower() for t in self.headers.get("connection", "").split(",")}
        if self.version == "HTTP/1.0":
            return "keep-alive" in tokens
        return "close" not in tokens

    def read(self) -> bytes:
        """The whole (rest of the) body."""
        return b"".join(iter(self._some, b""))

    def lines(self) -> Iterator[bytes]:
        """The body line by line (each with its line end), as it arrives."""
        pending = b""
        for data in iter(self._some, b""):
            pending += data
            *complete, pending = pending.split(b"\n")
            for line in complete:
                yield line + b"\n"
        if pending:
            yield pending

    def _some(self) -> bytes:
        """The next piece of the body; b"" once it is all read."""
        if self.done:
            return b""
        reader = self._reader
        if self._mode == "length":
            data = reader.read1(min(self._left, _READ_BYTES))
            if not data:
                raise ConnectionError(f"the body ended {self._left} bytes short")
            self._left -= len(data)
            self.done = self._left == 0
            return bytes(data)
        if self._mode == "close":
            data = reader.read1(_READ_BYTES)
            self.done = not data
            return bytes(data)
        if self._chunk_left == 0:
            size = _chunk_size(reader.readline(MAX_LINE_BYTES + 1))
            if size == 0:
                _headers(reader)  # the trailer section, up to its empty line
                self.done = True
                return b""
            self._chunk_left = size
        data = reader.read1(min(self._chunk_left, _READ_BYTES))
        if not data:
            raise ConnectionError("the body ended inside a chunk")
        self._chunk_left -= len(data)
        if self._chunk_left == 0 and reader.readline(3) not in (b"\r\n", b"\n"):
            raise ProtocolError("a chunk does not end with a line break")
        return bytes(data)


def authority(host: str, port: int) -> str:
    """`host:port`, with an IPv6 address in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _open_tunnel(raw: socket.socket, target: str, via: Proxy) -> None:
    """Ask the proxy for a tunnel to `target` and read its answer, up to its empty line."""
    lines = [f"CONNECT {target} HTTP/1.1", f"Host: {target}"]
    if via.authorization is not None:
        lines.append(f"Proxy-Authorization: {via.authorization}")
    raw.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
    # The proxy sends nothing after its answer until the TLS handshake begins, so this
    # reader cannot take bytes that belong to the tunnel.
    with raw.makefile("rb") as reader:
        line = reader.readline(MAX_LINE_BYTES + 1)
        if not line:
            raise ServerClosed("the proxy closed the connection without answering CONNECT")
        _, status, reason = _status_line(line)
        _headers(reader)
    if not 200 <= status < 300:
        raise TunnelRefused(status, reason)


def _status_line(line: bytes) -> tuple[str, int, str]:
    if len(line) > MAX_LINE_BYTES:
        raise ProtocolError("the status line is too long")
    text = line.decode("latin-1").rstrip("\r\n")
    version, _, rest = text.partition(" ")
    code, _, reason = rest.partition(" ")
    if not version.startswith("HTTP/1.") or len(code) != 3 or not code.isdigit():
        raise ProtocolError(f"not an HTTP/1.x status line: {text[:80]!r}")
    return version, int(code), reason


def _headers(reader: BufferedReader) -> dict[str, str]:
    headers: dict[str, str] = {}
    last = ""
    for _ in range(MAX_HEADERS + 1):
        line = reader.readline(MAX_LINE_BYTES + 1)
        if len(line) > MAX_LINE_BYTES:
            raise ProtocolError("a header line is too long")
        if line in (b"\r\n", b"\n"):
            return headers
        if not line:
            raise ProtocolError("the connection ended inside the headers")
        text = line.decode("latin-1").rstrip("\r\n")
        if text[:1] in (" ", "\t") and last:  # an obsolete folded continuation line
            headers[last] += " " + text.strip()
            continue
        name, colon, value = text.partition(":")
        if not colon or not name or name != name.strip():
            raise ProtocolError(f"not a header line: {text[:80]!r}")
        last = name.lower()
        value = value.strip()
        headers[last] = f"{headers[last]}, {value}" if last in headers else value
    raise ProtocolError(f"more than {MAX_HEADERS} header lines")


def _content_length(value: str) -> int:
    values = {v.strip() for v in value.split(",")}  # repeated equal values are allowed
    if len(values) != 1 or not (length := values.pop()).isdigit():
        raise ProtocolError(f"a Content-Length that is not one number: {value!r}")
    return int(length)


def _chunk_size(line: bytes) -> int:
    if not line:
        raise ConnectionError("the body ended before its last chunk")
    if len(line) > MAX_LINE_BYTES:
        raise ProtocolError("a chunk size line is too long")
    size = line.split(b";", 1)[0].strip()  # chunk extensions, after ";", mean nothing here
    if not size or not _HEX_DIGITS.issuperset(size):
        raise ProtocolError(f"not a chunk size: {size[:20]!r}")
    return int(size, 16)
