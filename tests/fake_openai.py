"""An OpenAI-compatible chat-completions server on loopback, answering from a script.

It speaks enough of the API for the `openai` kind: `POST /v1/chat/completions`, plain JSON
or server-sent events (`"stream": true`, sent with chunked transfer encoding), and it
records every request it received. Each request takes the next scripted `Reply`, or, when
the script is empty, asks the `responder` (by default: a short text answer). A reply can
wait (a delay, or a gate the test opens), fail with a status and headers (500, 429 with
`Retry-After`), send a body that is not JSON, or break off a stream.

Example:
    >>> with FakeOpenAI() as fake:
    ...     fake.script(Reply.call("memory_finish_edits"), Reply.error(500))
    ...     agent_config = {"base_url": fake.url, "model": "fake-model"}

Run on its own (the benchmark does, in a child process, so its CPU is not the runtime's):
    $ python -m tests.fake_openai --delay-ms 1     # prints its URL, serves until killed
"""

from __future__ import annotations

import argparse
import itertools
import json
import ssl
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

TLS_CERTIFICATE = Path(__file__).resolve().parent / "tls" / "localhost.pem"
"""A self-signed certificate for 127.0.0.1 and localhost (valid until 2126), for tests only;
a client trusts it through SSL_CERT_FILE."""
TLS_KEY = TLS_CERTIFICATE.with_name("localhost-key.pem")
HOLD_LIMIT_S = 30.0  # a gated reply is sent anyway after this long, so no test hangs for ever
MODEL = "fake-model"


@dataclass(frozen=True)
class Reply:
    """One scripted answer. Build it with the class methods: `text`, `call`, `calls`, ...

    `delay_s` waits before answering; `gate` waits until the test sets it. `status` other
    than 200 sends an OpenAI-style error body; `raw` sends these bytes as the body instead
    of a completion; `break_stream` ends a stream after its first chunk without `[DONE]`;
    `drop_connection` closes the connection after the answer without saying so (as a
    server does with an idle keep-alive connection).
    """

    content: str | None = None
    tool_calls: tuple[tuple[str, str], ...] = ()  # (name, arguments as JSON text)
    reasoning: str | None = None
    status: int = 200
    error_text: str = ""
    headers: tuple[tuple[str, str], ...] = ()
    raw: bytes | None = None
    delay_s: float = 0.0
    gate: threading.Event | None = None
    break_stream: bool = False
    drop_connection: bool = False

    @classmethod
    def text(cls, content: str, **options: Any) -> Reply:
        """An assistant answer with this text."""
        return cls(content=content, **options)

    @classmethod
    def call(
        cls, name: str, arguments: dict[str, Any] | str | None = None, **options: Any
    ) -> Reply:
        """An assistant answer calling one tool (arguments as a dict, or raw JSON text)."""
        return cls.calls((name, arguments), **options)

    @classmethod
    def calls(cls, *calls: tuple[str, dict[str, Any] | str | None], **options: Any) -> Reply:
        """An assistant answer calling several tools, in order."""
        encoded = tuple(
            (name, args if isinstance(args, str) else json.dumps(args or {}))
            for name, args in calls
        )
        return cls(tool_calls=encoded, **options)

    @classmethod
    def error(cls, status: int, message: str = "", retry_after: str | None = None) -> Reply:
        """An HTTP error with an OpenAI-style body, and `Retry-After` when given."""
        headers = () if retry_after is None else (("Retry-After", retry_after),)
        return cls(status=status, error_text=message or f"fake error {status}", headers=headers)

    @classmethod
    def malformed(cls, body: bytes = b'{"id": "chatcmpl-1", "choices": [') -> Reply:
        """A 200 answer whose body is not a completion (by default, not even JSON)."""
        return cls(raw=body)


@dataclass(frozen=True)
class Received:
    """A request the fake received: its path, headers (lower-case names), JSON body, time."""

    path: str
    headers: dict[str, str]
    body: dict[str, Any]
    at: float = 0.0  # time.monotonic() on arrival

    @property
    def messages(self) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = self.body.get("messages", [])
        return found

    @property
    def system(self) -> str:
        """The text of the first message when it is a system message, else ""."""
        first = self.messages[0] if self.messages else {}
        return str(first.get("content", "")) if first.get("role") == "system" else ""

    @property
    def tool_names(self) -> list[str]:
        return [tool["function"]["name"] for tool in self.body.get("tools", [])]

    @property
    def from_sleeptime(self) -> bool:
        """Whether the memory tools were offered: a sleeptime agent's request."""
        return bool(self.tool_names)


Responder = Callable[[Received], Reply]


def answer_text(request: Received) -> Reply:
    """The default responder: a short text answer."""
    return Reply.text("fake answer")


def keep_notes(request: Received) -> Reply:
    """A responder playing both agents, two model calls per sleeptime run.

    Offered tools (a sleeptime run): first rewrite the `human` block with the transcript's
    last user line, then, once a tool result came back, finish. No tools (the primary
    agent): a short text answer.
    """
    if not request.tool_names:
        return Reply.text("fake answer")
    last = request.messages[-1] if request.messages else {}
    if last.get("role") == "tool":
        return Reply.call("memory_finish_edits")
    said = [
        line.removeprefix("user: ")
        for line in str(last.get("content", "")).splitlines()
        if line.startswith("user: ")
    ]
    note = f"the user said: {said[-1]}" if said else "nothing said yet"
    return Reply.call("memory_rethink", {"label": "human", "text": note[:200]})


@dataclass
class _State:
    responder: Responder
    script: deque[Reply] = field(default_factory=deque)
    primary: deque[Reply] = field(default_factory=deque)
    sleeptime: deque[Reply] = field(default_factory=deque)
    received: list[Received] = field(default_factory=list)
    changed: threading.Condition = field(default_factory=threading.Condition)
    closing: threading.Event = field(default_factory=threading.Event)
    ids: Iterator[int] = field(default_factory=itertools.count)
    keep_requests: bool = True
    connections: int = 0


def tls_context() -> ssl.SSLContext:
    """The server side of https with the tests' certificate."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(TLS_CERTIFICATE, TLS_KEY)
    return context


class FakeOpenAI:
    """The fake server, on 127.0.0.1 and a free port, serving on a daemon thread.

    Use it as a context manager (or `start()` / `stop()`); `url` is its base URL
    (ending in `/v1`, as the SDK expects), `received` the requests so far.
    """

    def __init__(
        self,
        responder: Responder = answer_text,
        delay_s: float = 0.0,
        keep_requests: bool = True,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        """`tls`: serve https with this server context (e.g. `tls_context()`)."""
        self._state = _State(responder=responder, keep_requests=keep_requests)
        self._delay_s = delay_s
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._scheme = "http" if tls is None else "https"
        if tls is not None:
            self._server.socket = tls.wrap_socket(self._server.socket, server_side=True)
        self._server.daemon_threads = True
        self._server.fake = self  # type: ignore[attr-defined]
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"{self._scheme}://{host!s}:{port}/v1"

    def start(self) -> FakeOpenAI:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._state.closing.set()  # held and delayed replies give up at once
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> FakeOpenAI:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def script(self, *replies: Reply) -> None:
        """Queue replies for any request, taken in order before the responder is asked."""
        with self._state.changed:
            self._state.script.extend(replies)

    def script_primary(self, *replies: Reply) -> None:
        """Queue replies for requests without tools (a primary agent's), taken first."""
        with self._state.changed:
            self._state.primary.extend(replies)

    def script_sleeptime(self, *replies: Reply) -> None:
        """Queue replies for requests offering tools (a sleeptime agent's), taken first."""
        with self._state.changed:
            self._state.sleeptime.extend(replies)

    @property
    def received(self) -> list[Received]:
        with self._state.changed:
            return list(self._state.received)

    @property
    def connections(self) -> int:
        """How many connections clients opened so far (keep-alive reuses them)."""
        with self._state.changed:
            return self._state.connections

    def wait_for_requests(self, count: int, timeout: float = 10.0) -> list[Received]:
        """Wait until `count` requests arrived (AssertionError after `timeout`)."""
        with self._state.changed:
            arrived = self._state.changed.wait_for(
                lambda: len(self._state.received) >= count, timeout
            )
            assert arrived, f"the fake got {len(self._state.received)} request(s), not {count}"
            return list(self._state.received)

    # -- called by the handler -----------------------------------------------------------

    def _take(self, request: Received) -> Reply:
        state = self._state
        with state.changed:
            if state.keep_requests:
                state.received.append(request)
            state.changed.notify_all()
            own = state.sleeptime if request.from_sleeptime else state.primary
            queue = own if own else state.script
            scripted = queue.popleft() if queue else None
        return scripted if scripted is not None else state.responder(request)

    def _connected(self) -> None:
        with self._state.changed:
            self._state.connections += 1

    def _hold(self, reply: Reply) -> None:
        delay = reply.delay_s or self._delay_s
        if delay:
            self._state.closing.wait(delay)
        if reply.gate is not None:
            deadline = time.monotonic() + HOLD_LIMIT_S
            while not reply.gate.wait(0.05):
                if self._state.closing.is_set() or time.monotonic() > deadline:
                    return

    def _next_id(self) -> str:
        return f"chatcmpl-{next(self._state.ids)}"


class _Server(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that gave up (a timeout test) leaves a broken pipe behind: not news.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the SDK's connection pool expects
    disable_nagle_algorithm = True  # headers and body leave at once, not 40 ms apart

    def setup(self) -> None:
        super().setup()
        self.server.fake._connected()  # type: ignore[attr-defined]

    def log_message(self, format: str, *args: Any) -> None:
        return  # the tests' output stays clean

    def do_POST(self) -> None:
        fake: FakeOpenAI = self.server.fake  # type: ignore[attr-defined]
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length)
        if not self.path.rstrip("/").endswith("/chat/completions"):
            self._json(404, _error_body(f"no route {self.path}", "not_found"))
            return
        try:
            body = json.loads(raw)
        except ValueError:
            self._json(400, _error_body("the request body is not JSON", "invalid_request_error"))
            return
        headers = {name.lower(): value for name, value in self.headers.items()}
        reply = fake._take(Received(self.path, headers, body, time.monotonic()))
        fake._hold(reply)
        if reply.status != 200:
            kind = "rate_limit_error" if reply.status == 429 else "server_error"
            self._json(reply.status, _error_body(reply.error_text, kind), reply.headers)
        elif reply.raw is not None:
            self._send(200, reply.raw, "application/json", reply.headers)
        elif body.get("stream"):
            self._stream(fake._next_id(), body.get("model", MODEL), reply)
        else:
            self._json(200, _completion(fake._next_id(), body.get("model", MODEL), reply))
        if reply.drop_connection:
            self.close_connection = True

    def _json(
        self, status: int, payload: dict[str, Any], headers: tuple[tuple[str, str], ...] = ()
    ) -> None:
        self._send(status, json.dumps(payload).encode(), "application/json", headers)

    def _send(
        self, status: int, data: bytes, content_type: str, headers: tuple[tuple[str, str], ...]
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def _stream(self, completion_id: str, model: str, reply: Reply) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for number, chunk in enumerate(_chunks(completion_id, model, reply)):
            self._chunk(f"data: {json.dumps(chunk)}\n\n".encode())
            if reply.break_stream and number == 1:
                self.close_connection = True  # no [DONE], no last chunk: a dropped connection
                return
        self._chunk(b"data: [DONE]\n\n")
        self._chunk(b"")

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()


def _error_body(message: str, kind: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": None, "code": None}}


_CALL_IDS = itertools.count(1)


def _tool_calls(reply: Reply) -> list[dict[str, Any]]:
    return [
        {
            "id": f"call_{next(_CALL_IDS)}",
            "type": "function",
            "function": {"name": name, "arguments": args},
        }
        for name, args in reply.tool_calls
    ]


def _completion(completion_id: str, model: str, reply: Reply) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": reply.content}
    if reply.tool_calls:
        message["tool_calls"] = _tool_calls(reply)
    if reply.reasoning is not None:
        message["reasoning_content"] = reply.reasoning
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": message,
                "finish_reason": "tool_calls" if reply.tool_calls else "stop",
            }
        ],
        "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
    }


def _chunks(completion_id: str, model: str, reply: Reply) -> Iterator[dict[str, Any]]:
    """The stream of a reply: the role, the text in pieces, each tool call in pieces, the end."""

    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }

    yield chunk({"role": "assistant", "content": ""})
    if reply.reasoning:
        yield chunk({"reasoning_content": reply.reasoning})
    text = reply.content or ""
    for start in range(0, len(text), 4):
        yield chunk({"content": text[start : start + 4]})
    for index, call in enumerate(_tool_calls(reply)):
        function = call["function"]
        yield chunk(
            {
                "tool_calls": [
                    {
                        **call,
                        "index": index,
                        "function": {"name": function["name"], "arguments": ""},
                    }
                ]
            }
        )
        arguments = function["arguments"]
        for start in range(0, len(arguments), 8):
            piece = {"arguments": arguments[start : start + 8]}
            yield chunk({"tool_calls": [{"index": index, "function": piece}]})
    yield chunk({}, "tool_calls" if reply.tool_calls else "stop")


def main(argv: list[str] | None = None) -> int:
    """Serve until killed, answering with `keep_notes`; print the URL on the first line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--delay-ms", type=float, default=1.0, help="each answer's latency")
    args = parser.parse_args(argv)
    fake = FakeOpenAI(keep_notes, delay_s=args.delay_ms / 1000, keep_requests=False)
    fake.start()
    print(fake.url, flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        fake.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
