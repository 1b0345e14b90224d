"""A thin HTTP client for an OpenAI-compatible `/chat/completions` endpoint.

It does one request per call (retries are the caller's, see `openai_chat.py`) and keeps its
connections alive between calls. It is built on a small HTTP/1.1 connection of its own
(`_http1.py`) because the runtime pays its CPU on every model call: measured against a
loopback server, one request costs about 0.07 ms of CPU here, 0.16 ms with the standard
library's `http.client`, 0.5 ms with httpx and 1.2-2 ms with the official `openai` SDK
(which builds typed models around every request and answer).

Every failure is one of the `ChatFailure` classes below, so a caller decides on retries by
type: `ServerStatus` (with the status, the server's message and `Retry-After`),
`ServerTimeout`, `ServerUnreachable`, or `MalformedAnswer`.

Example:
    >>> endpoint = ChatEndpoint("http://127.0.0.1:11434/v1", api_key=None, timeout_s=60)
    >>> endpoint.complete({"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}]})
"""

from __future__ import annotations

import ipaddress
import json
import math
import ssl
import threading
import time
import urllib.request
from collections.abc import Iterator, Mapping
from email.utils import parsedate_to_datetime
from importlib.metadata import PackageNotFoundError, version
from typing import Any
from urllib.parse import urlsplit

from actors.kinds._http1 import (
    Answer,
    Connection,
    ProtocolError,
    Proxy,
    TunnelRefused,
    request_head,
)
from messages._errors import describe, text_of

MAX_IDLE_CONNECTIONS = 4
_SHOWN_BODY_CHARS = 300


class ChatFailure(Exception):
    """A request to the model server that did not give an answer."""


class ServerStatus(ChatFailure):
    """The server answered with an HTTP error status."""

    def __init__(self, status: int, message: str, retry_after: float | None = None) -> None:
        self.status = status
        self.message = message
        self.retry_after = retry_after
        super().__init__(f"HTTP {status}: {message}")


class ServerTimeout(ChatFailure):
    """The server did not answer (connect, or a read) within the timeout."""


class ServerUnreachable(ChatFailure):
    """No connection, or one that broke off before the answer was complete."""


class MalformedAnswer(ChatFailure):
    """An answer that is not what the API promises (not JSON, no choices, ...)."""


def parse_retry_after(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """Seconds the server asks to wait: `retry-after-ms`, or `Retry-After` in (fractional)
    seconds or as an HTTP date; None when absent or unreadable.

    >>> parse_retry_after({"Retry-After": "0.05"})
    0.05
    """
    lowered = {name.lower(): value for name, value in headers.items()}
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        text = lowered.get(name, "").strip()
        if not text:
            continue
        try:
            seconds = float(text) * scale
        except ValueError:
            if scale != 1.0:
                continue
            try:
                moment = parsedate_to_datetime(text)
            except (TypeError, ValueError):
                continue
            seconds = moment.timestamp() - (time.time() if now is None else now)
        if math.isfinite(seconds):
            return max(0.0, seconds)
    return None


def error_message(data: bytes) -> str:
    """The server's explanation in an error body: OpenAI's `error.message`, or the text."""
    try:
        payload = json.loads(data)
    except (ValueError, RecursionError):
        payload = None
    if isinstance(payload, dict):
        error = payload.get("error", payload)
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return str(error["message"])
        if isinstance(error, str):
            return error
        if isinstance(payload.get("detail"), str):  # FastAPI-style servers
            return str(payload["detail"])
    text = data.decode("utf-8", "replace").strip()
    return " ".join(text.split())[:_SHOWN_BODY_CHARS] or "(empty body)"


def _user_agent() -> str:
    try:
        return f"sleeptime-runtime/{version('sleeptime-runtime')}"
    except PackageNotFoundError:
        return "sleeptime-runtime"


class ChatEndpoint:
    """`POST {base_url}/chat/completions`, as JSON or as server-sent events.

    Safe to use from several threads; idle connections are kept (up to
    `MAX_IDLE_CONNECTIONS`) and reused. A reused connection that the server had closed
    meanwhile is replaced once, at no cost to the caller's retries.

    `proxy`: an http:// proxy URL, "" for none; None (the default) takes the one the
    environment names for this URL (`HTTPS_PROXY` / `HTTP_PROXY`, unless `NO_PROXY`
    matches the host or the host is loopback), as curl and the `openai` SDK do.
    """

    def __init__(
        self, base_url: str, api_key: str | None, timeout_s: float, proxy: str | None = None
    ) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"base_url {base_url!r} must be an http:// or https:// URL")
        self.base_url = base_url
        self.timeout_s = timeout_s
        https = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port or (443 if https else 80)
        self._authority = parts.netloc.rpartition("@")[2]  # the Host header: no user info
        self._path = parts.path.rstrip("/") + "/chat/completions"
        if parts.query:
            self._path += f"?{parts.query}"
        self._headers = {"Content-Type": "application/json", "User-Agent": _user_agent()}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._tls = ssl.create_default_context() if https else None
        if proxy is None:
            proxy = proxy_from_environment(parts.scheme, self._host)
        self._proxy = Proxy.parse(proxy) if proxy else None
        self._target = self._path
        if self._proxy is not None and not https:
            # A proxy forwards a plain-http request named by its whole URL.
            self._target = f"http://{self._authority}{self._path}"
            if self._proxy.authorization is not None:
                self._headers["Proxy-Authorization"] = self._proxy.authorization
        self._idle: list[Connection] = []
        self._lock = threading.Lock()

    @property
    def proxy(self) -> str | None:
        """The proxy the requests go through (without its password), if any."""
        return None if self._proxy is None else self._proxy.shown

    def complete(self, body: Mapping[str, Any]) -> dict[str, Any]:
        """Send one request and return its JSON answer (an object)."""
        connection, answer = self._send(body, "application/json")
        try:
            data = answer.read()
        except TimeoutError as error:
            raise ServerTimeout(f"no complete answer within {self.timeout_s:g} s") from error
        except (OSError, ProtocolError) as error:
            raise ServerUnreachable(f"the answer broke off: {_describe(error)}") from error
        finally:
            self._release(connection, answer)
        _check_status(answer, data)
        return _json_object(data)

    def stream(self, body: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
        """Send one streaming request and yield each event's JSON object, up to `[DONE]`.

        A server that ignores `stream` and answers with plain JSON yields that one object.
        """
        connection, answer = self._send(body, "text/event-stream")
        try:
            if answer.status >= 400:
                _check_status(answer, _read_all(answer, self.timeout_s))
            if "event-stream" not in answer.headers.get("content-type", ""):
                yield _json_object(_read_all(answer, self.timeout_s))
                return
            for event in _events(answer, self.timeout_s):
                if event == "[DONE]":
                    _read_all(answer, self.timeout_s)  # the body's end: the connection is reusable
                    return
                yield _json_object(event.encode())
            raise ServerUnreachable("the event stream ended before [DONE]")
        finally:
            self._release(connection, answer)  # closed unless the whole body was read

    def close(self) -> None:
        """Close the idle connections (a later request opens new ones)."""
        with self._lock:
            idle, self._idle = self._idle, []
        for connection in idle:
            connection.close()

    # -- connections ----------------------------------------------------------------------

    def _send(self, body: Mapping[str, Any], accept: str) -> tuple[Connection, Answer]:
        data = json.dumps(body).encode()
        head = request_head(
            "POST", self._target, self._authority, {**self._headers, "Accept": accept}, len(data)
        )
        reused = True
        with self._lock:
            connection = self._idle.pop() if self._idle else None
        while True:
            try:
                if connection is None:
                    reused = False
                    connection = Connection(
                        self._host, self._port, self.timeout_s, self._tls, self._proxy
                    )
                connection.send(head, data)
                return connection, connection.answer()
            except TimeoutError as error:
                _close(connection)
                raise ServerTimeout(f"no answer within {self.timeout_s:g} s{self._via}") from error
            except TunnelRefused as error:
                raise ServerStatus(
                    error.status, f"the proxy at {self.proxy} refused the tunnel: {error}"
                ) from error
            except ConnectionError as error:
                _close(connection)
                if not reused:
                    raise ServerUnreachable(_describe(error) + self._via) from error
                # The server closed this idle connection meanwhile: a fresh one is not a retry.
                connection = None
            except (OSError, ProtocolError) as error:
                _close(connection)
                raise ServerUnreachable(_describe(error) + self._via) from error

    @property
    def _via(self) -> str:
        return "" if self._proxy is None else f" (through the proxy at {self._proxy.shown})"

    def _release(self, connection: Connection, answer: Answer) -> None:
        if answer.reusable:
            with self._lock:
                if len(self._idle) < MAX_IDLE_CONNECTIONS:
                    self._idle.append(connection)
                    return
        connection.close()


def proxy_from_environment(scheme: str, host: str) -> str | None:
    """The proxy the environment names for `scheme` (http/https); None when there is none,
    when NO_PROXY names `host`, or for a loopback host (a local model server is never
    reached through a proxy, as in Go's net/http)."""
    proxies = urllib.request.getproxies()  # *_proxy variables, lower case first; "no" too
    if not proxies.get(scheme) or _loopback(host) or _bypassed(host, proxies.get("no", "")):
        return None
    return proxies[scheme]


def _loopback(host: str) -> bool:
    if host.lower() == "localhost" or host.lower().endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _bypassed(host: str, no_proxy: str) -> bool:
    """Whether NO_PROXY (comma-separated hosts or domains, "*" for all) names `host`."""
    host = host.lower().strip("[]")
    for raw in no_proxy.lower().split(","):
        name = raw.strip()
        if name == "*":
            return True
        if name.startswith("[") and "]" in name:  # [IPv6]:port
            name = name[1 : name.index("]")]
        elif name.count(":") == 1:  # host:port: the port does not matter here
            name = name.partition(":")[0]
        name = name.lstrip(".")
        if name and (host == name or host.endswith("." + name)):
            return True
    return False


def _close(connection: Connection | None) -> None:
    if connection is not None:
        connection.close()


def _read_all(answer: Answer, timeout_s: float) -> bytes:
    try:
        return answer.read()
    except TimeoutError as error:
        raise ServerTimeout(f"no complete answer within {timeout_s:g} s") from error
    except (OSError, ProtocolError) as error:
        raise ServerUnreachable(f"the answer broke off: {_describe(error)}") from error


def _check_status(answer: Answer, data: bytes) -> None:
    if answer.status >= 400:
        raise ServerStatus(answer.status, error_message(data), parse_retry_after(answer.headers))


def _json_object(data: bytes) -> dict[str, Any]:
    try:
        payload = json.loads(data)
    except (ValueError, RecursionError) as error:  # (nested too deeply to read)
        raise MalformedAnswer(f"the answer is not JSON ({error}): {_shown(data)}") from error
    if not isinstance(payload, dict):
        raise MalformedAnswer(f"the answer is not a JSON object: {_shown(data)}")
    return payload


def _events(answer: Answer, timeout_s: float) -> Iterator[str]:
    """The `data` of each server-sent event (multi-line data joined by newlines)."""
    data: list[str] = []
    lines = answer.lines()
    while True:
        try:
            raw = next(lines, b"")
        except TimeoutError as error:
            raise ServerTimeout(f"the stream stalled for {timeout_s:g} s") from error
        except (OSError, ProtocolError) as error:
            raise ServerUnreachable(f"the stream broke off: {_describe(error)}") from error
        if not raw:
            if data:
                yield "\n".join(data)
            return
        line = raw.decode("utf-8", "replace").rstrip("\r\n")
        if not line:
            if data:
                yield "\n".join(data)
                data = []
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
        # Comments (":"), `event:`, `id:` and `retry:` lines carry nothing we use.


def _shown(data: bytes) -> str:
    text = data.decode("utf-8", "replace")
    return repr(text if len(text) <= _SHOWN_BODY_CHARS else text[:_SHOWN_BODY_CHARS] + "...")


def _describe(error: BaseException) -> str:
    return describe(error) if text_of(error) else type(error).__name__
