"""The HTTP/1.1 client connection under the `openai` kind, against a server sending raw bytes.

Each test scripts exactly what a loopback server writes back, so the framing cases real
servers produce (length, chunked with extensions and trailers, read-until-close, interim
answers) and the broken ones are all covered, byte for byte.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from actors.kinds._http1 import (
    MAX_HEADERS,
    Answer,
    Connection,
    ProtocolError,
    ServerClosed,
    request_head,
)

BODY = b'{"hello": "world"}'


class Scripted:
    """A one-connection server: for each request it reads, it sends the next reply."""

    def __init__(self, replies: list[bytes], close_after: bool = False) -> None:
        self.replies = replies
        self.close_after = close_after
        self.requests: list[bytes] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        peer, _ = self._listener.accept()
        with peer:
            buffered = b""
            for reply in self.replies:
                while b"\r\n\r\n" not in buffered:
                    data = peer.recv(65536)
                    if not data:
                        return
                    buffered += data
                head, _, buffered = buffered.partition(b"\r\n\r\n")
                length = next(
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
                while len(buffered) < length:
                    data = peer.recv(65536)
                    if not data:
                        return  # the client went away mid-request
                    buffered += data
                self.requests.append(head + b"\r\n\r\n" + buffered[:length])
                buffered = buffered[length:]
                peer.sendall(reply)
            while not self.close_after and peer.recv(65536):
                pass  # hold the connection (reading what comes) until the client is done

    def close(self) -> None:
        self._listener.close()
        self._thread.join(5)


@contextmanager
def server(*replies: bytes, close_after: bool = False) -> Iterator[tuple[Scripted, Connection]]:
    scripted = Scripted(list(replies), close_after)
    connection = Connection("127.0.0.1", scripted.port, timeout_s=5)
    try:
        yield scripted, connection
    finally:
        connection.close()
        scripted.close()


def ask(connection: Connection, port: int, body: bytes = BODY) -> Answer:
    head = request_head("POST", "/v1/chat", f"127.0.0.1:{port}", {"Accept": "*/*"}, len(body))
    connection.send(head, body)
    return connection.answer()


def test_a_request_carries_its_host_length_and_headers_and_the_connection_is_reused() -> None:
    reply = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
    with server(reply, reply) as (scripted, connection):
        for _ in range(2):
            answer = ask(connection, scripted.port)
            assert (answer.status, answer.reason, answer.read()) == (200, "OK", b"{}")
            assert answer.headers["content-type"] == "application/json"
            assert answer.reusable
    first = scripted.requests[0]
    assert first.startswith(b"POST /v1/chat HTTP/1.1\r\n")
    assert f"Host: 127.0.0.1:{scripted.port}\r\n".encode() in first
    assert (
        first[first.index(b"Content-Length") :]
        == b"Content-Length: 18\r\nAccept: */*\r\n\r\n" + BODY
    )
    assert len(scripted.requests) == 2


def test_a_chunked_body_with_extensions_and_trailers() -> None:
    reply = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5;name=value\r\ndata:\r\n"
        b"7\r\n one\n\nd\r\n"
        b"0\r\nX-Trailer: yes\r\n\r\n"
    )
    with server(reply, reply) as (scripted, connection):
        assert ask(connection, scripted.port).read() == b"data: one\n\nd"
        answer = ask(connection, scripted.port)  # the trailers were read: the next answer parses
        assert list(answer.lines()) == [b"data: one\n", b"\n", b"d"]
        assert answer.reusable


def test_an_interim_answer_is_skipped() -> None:
    reply = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n"
    with server(reply) as (scripted, connection):
        answer = ask(connection, scripted.port)
        assert (answer.status, answer.read(), answer.reusable) == (201, b"", True)


def test_a_body_without_length_lasts_until_the_connection_closes() -> None:
    reply = b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nall of it"
    with server(reply, close_after=True) as (scripted, connection):
        answer = ask(connection, scripted.port)
        assert answer.read() == b"all of it"
        assert not answer.reusable


@pytest.mark.parametrize(
    ("headers", "reusable"),
    [
        (b"Connection: close\r\nContent-Length: 0\r\n", False),
        (b"Connection: keep-alive, Upgrade\r\nContent-Length: 0\r\n", True),
    ],
)
def test_connection_close_is_honoured(headers: bytes, reusable: bool) -> None:
    with server(b"HTTP/1.1 200 OK\r\n" + headers + b"\r\n") as (scripted, connection):
        answer = ask(connection, scripted.port)
        answer.read()
        assert answer.reusable is reusable


def test_http_1_0_keeps_the_connection_only_when_asked() -> None:
    reply = b"HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\nContent-Length: 1\r\n\r\nx"
    with server(reply) as (scripted, connection):
        answer = ask(connection, scripted.port)
        assert answer.read() == b"x" and answer.reusable


def test_no_content_has_no_body() -> None:
    with server(b"HTTP/1.1 204 No Content\r\n\r\n") as (scripted, connection):
        answer = ask(connection, scripted.port)
        assert (answer.read(), answer.reusable) == (b"", True)


def test_repeated_and_folded_headers() -> None:
    reply = (
        b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 2\r\nX-Note: a\r\nx-note: b\r\n"
        b"X-Long: first\r\n  second\r\nContent-Length: 0\r\n\r\n"
    )
    with server(reply) as (scripted, connection):
        answer = ask(connection, scripted.port)
        assert answer.status == 429
        assert answer.headers["x-note"] == "a, b"
        assert answer.headers["x-long"] == "first second"
        assert answer.headers["retry-after"] == "2"


@pytest.mark.parametrize(
    "reply",
    [
        b"SSH-2.0-OpenSSH\r\n\r\n",
        b"HTTP/1.1 2xx OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1, 2\r\n\r\nx",
        b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * (MAX_HEADERS + 1) + b"\r\n",
    ],
)
def test_what_is_not_http_is_a_protocol_error(reply: bytes) -> None:
    with server(reply) as (scripted, connection), pytest.raises(ProtocolError):
        ask(connection, scripted.port)


@pytest.mark.parametrize(
    "reply",
    [
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n-3\r\nabc\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcX\r\n",
    ],
)
def test_a_broken_chunk_is_a_protocol_error(reply: bytes) -> None:
    with server(reply) as (scripted, connection):
        answer = ask(connection, scripted.port)
        with pytest.raises(ProtocolError):
            answer.read()


@pytest.mark.parametrize(
    "reply",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\n",
    ],
)
def test_a_body_cut_short_is_a_connection_error(reply: bytes) -> None:
    with server(reply, close_after=True) as (scripted, connection):
        answer = ask(connection, scripted.port)
        with pytest.raises(ConnectionError):
            answer.read()
        assert not answer.reusable


def test_a_server_that_closes_without_answering() -> None:
    with server(b"", close_after=True) as (scripted, connection), pytest.raises(ServerClosed):
        ask(connection, scripted.port)


def test_a_server_that_never_answers_times_out() -> None:
    scripted = Scripted([])  # accepts, reads nothing, says nothing
    connection = Connection("127.0.0.1", scripted.port, timeout_s=0.2)
    try:
        with pytest.raises(TimeoutError):
            ask(connection, scripted.port)
    finally:
        connection.close()
        scripted.close()


@settings(max_examples=40, deadline=None)
@given(
    body=st.binary(max_size=300),
    cuts=st.lists(st.integers(1, 300), max_size=8),
)
def test_any_body_in_any_chunks_reads_back_whole(body: bytes, cuts: list[int]) -> None:
    pieces, rest = [], body
    for cut in cuts:
        if rest:
            pieces.append(rest[:cut])
            rest = rest[cut:]
    if rest:
        pieces.append(rest)
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"
    reply = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked
    with server(reply, reply) as (scripted, connection):
        assert ask(connection, scripted.port).read() == body
        assert b"".join(ask(connection, scripted.port).lines()) == body
