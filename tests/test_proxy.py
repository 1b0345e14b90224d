"""The `openai` kind over https and through HTTP proxies, against loopback servers.

The fake model server speaks https with the tests' own certificate (`tests/tls/`, trusted
through SSL_CERT_FILE); a small proxy on loopback opens CONNECT tunnels and forwards
absolute-form requests, recording what it was asked.
"""

from __future__ import annotations

import base64
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import pytest
from pydantic import ValidationError

from actors import Runtime
from actors.kinds import OpenAIConfig
from actors.kinds._chat_http import ChatEndpoint, ServerUnreachable, proxy_from_environment
from messages import MessageCreate, PrimaryAgentError
from tests.fake_openai import TLS_CERTIFICATE, FakeOpenAI, Reply, tls_context

BODY = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}


@dataclass
class Asked:
    method: str
    target: str
    headers: dict[str, str]


@dataclass
class FakeProxy:
    """An HTTP proxy on loopback: CONNECT tunnels, absolute-form forwarding, or a refusal."""

    refuse: int | None = None
    asked: list[Asked] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self._listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        with client:
            buffered = b""
            while b"\r\n\r\n" not in buffered:
                data = client.recv(65536)
                if not data:
                    return
                buffered += data
            head = buffered.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
            method, target, _ = head[0].split(" ", 2)
            headers = {
                name.strip().lower(): value.strip()
                for name, _, value in (line.partition(":") for line in head[1:])
            }
            self.asked.append(Asked(method, target, headers))
            if self.refuse is not None:
                client.sendall(b"HTTP/1.1 %d Refused\r\nContent-Length: 0\r\n\r\n" % self.refuse)
                return
            if method == "CONNECT":
                host, _, port = target.rpartition(":")
                upstream = socket.create_connection((host, int(port)))
                client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
            else:
                parts = urlsplit(target)
                upstream = socket.create_connection((parts.hostname, parts.port or 80))
                upstream.sendall(buffered)  # servers take the absolute form too
            with upstream:
                copier = threading.Thread(target=_copy, args=(upstream, client), daemon=True)
                copier.start()
                _copy(client, upstream)
                copier.join(5)


def _copy(source: socket.socket, sink: socket.socket) -> None:
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:
        pass
    finally:
        try:
            sink.shutdown(socket.SHUT_WR)
        except OSError:
            pass


@pytest.fixture
def trusted(monkeypatch: pytest.MonkeyPatch) -> None:
    """Clients made from now on trust the tests' certificate (and only it)."""
    monkeypatch.setenv("SSL_CERT_FILE", str(TLS_CERTIFICATE))


@pytest.fixture
def https_fake(trusted: None) -> Iterator[FakeOpenAI]:
    with FakeOpenAI(tls=tls_context()) as server:
        yield server


@pytest.fixture
def proxy() -> Iterator[FakeProxy]:
    made = FakeProxy()
    yield made
    made.close()


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def test_https_is_verified_against_the_trusted_certificates(https_fake: FakeOpenAI) -> None:
    endpoint = ChatEndpoint(https_fake.url, api_key="k", timeout_s=5, proxy="")
    https_fake.script(Reply.text("over TLS"))
    assert endpoint.complete(BODY)["choices"][0]["message"]["content"] == "over TLS"
    assert https_fake.received[0].headers["authorization"] == "Bearer k"


def test_https_to_an_untrusted_server_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    with FakeOpenAI(tls=tls_context()) as server:
        monkeypatch.delenv("SSL_CERT_FILE", raising=False)
        endpoint = ChatEndpoint(server.url, api_key=None, timeout_s=5, proxy="")
        with pytest.raises(ServerUnreachable, match="CERTIFICATE_VERIFY_FAILED"):
            endpoint.complete(BODY)
        assert server.received == []


def test_https_goes_through_one_connect_tunnel_with_the_proxy_credentials(
    https_fake: FakeOpenAI, proxy: FakeProxy
) -> None:
    via = f"http://ada:p%40ss@127.0.0.1:{proxy.port}"
    endpoint = ChatEndpoint(https_fake.url, api_key=None, timeout_s=5, proxy=via)
    https_fake.script(Reply.text("one"), Reply.text("two"))

    answers = [endpoint.complete(BODY)["choices"][0]["message"]["content"] for _ in range(2)]

    assert answers == ["one", "two"]
    fake_port = urlsplit(https_fake.url).port
    assert [(a.method, a.target) for a in proxy.asked] == [("CONNECT", f"127.0.0.1:{fake_port}")]
    assert proxy.asked[0].headers["proxy-authorization"] == basic("ada", "p@ss")
    assert endpoint.proxy == f"http://127.0.0.1:{proxy.port}"  # no password shown
    assert "proxy-authorization" not in https_fake.received[0].headers  # stays at the proxy


def test_plain_http_through_a_proxy_names_the_whole_url(proxy: FakeProxy) -> None:
    with FakeOpenAI() as fake:
        endpoint = ChatEndpoint(fake.url, api_key=None, timeout_s=5, proxy=proxy.url)
        fake.script(Reply.text("forwarded"))
        assert endpoint.complete(BODY)["choices"][0]["message"]["content"] == "forwarded"
        assert [(a.method, a.target) for a in proxy.asked] == [
            ("POST", f"{fake.url}/chat/completions")
        ]
        assert len(fake.received) == 1


def test_a_refused_tunnel_fails_the_turn_at_once_with_a_hint(
    rt: Runtime, https_fake: FakeOpenAI
) -> None:
    proxy = FakeProxy(refuse=407)
    try:
        config = {"base_url": https_fake.url, "model": "fake-model", "proxy": proxy.url}
        group = rt.create_group(
            primary={"kind": "openai", "config": config},
            sleeptime=[{"kind": "memory"}],
            frequency=0,
        )
        with pytest.raises(PrimaryAgentError, match="407") as raised:
            rt.step(group.id, [MessageCreate(role="user", content="hi")])
        assert "refused the tunnel" in str(raised.value)
        assert "proxy's user and password" in str(raised.value)
        assert len(proxy.asked) == 1  # a 407 is not retried
        assert https_fake.received == []
    finally:
        proxy.close()


def test_an_agent_given_a_proxy_reaches_its_model_through_it(
    rt: Runtime, https_fake: FakeOpenAI, proxy: FakeProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HTTPS_PROXY", proxy.url)
    endpoint = ChatEndpoint(https_fake.url, api_key=None, timeout_s=5)
    assert endpoint.proxy is None  # the environment's proxy never serves a loopback server
    config = {"base_url": https_fake.url, "model": "fake-model", "proxy": proxy.url}
    group = rt.create_group(
        primary={"kind": "openai", "config": config}, sleeptime=[{"kind": "memory"}], frequency=0
    )
    https_fake.script(Reply.text("through the proxy"))
    said = rt.step(group.id, [MessageCreate(role="user", content="hi")])
    assert said.messages[-1].text() == "through the proxy"
    assert [a.method for a in proxy.asked] == ["CONNECT"]


def test_which_proxy_the_environment_names(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTPS_PROXY", "http://corp:3128")
    monkeypatch.setenv("NO_PROXY", ".internal, models.example.com:443")

    assert proxy_from_environment("https", "api.openai.com") == "http://corp:3128"
    assert proxy_from_environment("http", "api.openai.com") is None  # no HTTP_PROXY
    assert proxy_from_environment("https", "gpu.internal") is None
    assert proxy_from_environment("https", "a.models.example.com") is None
    assert proxy_from_environment("https", "models.example.org") == "http://corp:3128"
    for loopback in ("127.0.0.1", "127.3.2.1", "localhost", "::1", "[::1]"):
        assert proxy_from_environment("https", loopback) is None
    monkeypatch.setenv("NO_PROXY", "*")
    assert proxy_from_environment("https", "api.openai.com") is None


def test_a_proxy_must_be_an_http_url() -> None:
    with pytest.raises(ValidationError, match="only http:// proxies"):
        OpenAIConfig(model="m", proxy="https://corp:3128")
    with pytest.raises(ValidationError, match="proxy"):
        OpenAIConfig(model="m", proxy="http://corp:notaport")
    assert OpenAIConfig(model="m", proxy="").proxy == ""
    assert OpenAIConfig(model="m", proxy="corp:3128").proxy == "corp:3128"
    with pytest.raises(ValueError, match="only http:// proxies"):
        ChatEndpoint("https://api.openai.com/v1", api_key=None, timeout_s=5, proxy="socks5://x:1")
