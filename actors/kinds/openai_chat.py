"""The `openai` kind: an LLM agent on any OpenAI-compatible chat-completions server.

OpenAI, vLLM, Ollama, LM Studio, the llama.cpp server, ...: anything that serves
`POST {base_url}/chat/completions`. One agent kind plays both roles, told apart by the
context (a sleeptime run has a run id, a primary turn has none):

- primary: the system prompt carries the memory blocks, then the recent conversation and the
  turn's input are sent; the answer is one assistant message. `stream` asks for server-sent
  events and yields that message when it is complete (a message is the unit of the
  runtime's API, not a token).
- sleeptime: the transcript is sent with the memory tools offered as function tools; each
  tool call runs and its result (or why it failed) goes back to the model, until it calls
  `memory_finish_edits`, answers without a tool call, or `max_steps` requests were made
  (stop reason `max_steps`). Each answer of the model (an assistant message with its tool
  calls) and each tool result is returned, so the runtime stores them after the transcript
  in the agent's history, tagged with the run id. Each run starts afresh: the system prompt
  with the blocks, and the transcript.

Failures: 429, 5xx, timeouts and lost connections are retried up to `max_retries` times with
exponential backoff and jitter, or after the server's `Retry-After`; the wait ends early if
the run is cancelled. Then, or at once for any other HTTP error, a malformed answer or a
call of an unknown tool, the step fails with a `ModelServerError` saying what happened (stop
reason `timeout` when the server did not answer in time, else `error`); a sleeptime run
keeps the tool calls it made before.

Example:
    >>> rt.create_group(
    ...     primary={"kind": "openai", "config": {"base_url": "http://127.0.0.1:11434/v1",
    ...                                         "model": "llama3.2"}},
    ...     sleeptime=[{"kind": "openai", "config": {"base_url": "http://127.0.0.1:11434/v1",
    ...                                            "model": "llama3.2", "max_steps": 6}}])
"""

from __future__ import annotations

import os
import random
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from actors.kinds._chat_http import (
    ChatEndpoint,
    ChatFailure,
    ServerStatus,
    ServerTimeout,
    ServerUnreachable,
)
from actors.kinds._chat_protocol import (
    DEFAULT_PRIMARY_SYSTEM,
    DEFAULT_SLEEPTIME_SYSTEM,
    Answer,
    RecentChat,
    StreamedAnswer,
    chat_history,
    parse_completion,
    system_prompt,
)
from actors.kinds._chat_tools import (
    FINISH,
    MEMORY_TOOLS,
    TOOL_NAMES,
    call_memory_tool,
    tool_message,
)
from actors.kinds._http1 import Proxy
from actors.sdk import AgentContext, AgentRole, StepFailed, StepResult, parse_config
from messages import AgentConfigError, Message, MessageCreate, StopReason
from messages._errors import describe
from messages._log import get_logger

log = get_logger("sleeptime.openai")

KIND = "openai"
MAX_BACKOFF_S = 30.0
"""The longest wait between two attempts, whatever `Retry-After` asks for."""
_RETRIED_STATUSES = frozenset({408, 429})
_HINTS = {
    401: "check api_key or api_key_env",
    403: "check api_key or api_key_env, and that the key may use this model",
    404: "check base_url (it usually ends in /v1) and model",
    407: "check the proxy's user and password (http://user:password@host:port)",
}


class OpenAIConfig(BaseModel):
    """The config of an `openai` agent.

    `api_key` is stored with the agent in the database, in clear: prefer `api_key_env`, the
    name of an environment variable holding the key, read when the agent is built. With
    neither, no key is sent (local servers need none). A password in `proxy` is stored the
    same way: prefer the environment's HTTPS_PROXY for one.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")
    base_url: str = "https://api.openai.com/v1"
    model: str = Field(min_length=1)
    api_key: str | None = None
    api_key_env: str | None = Field(default=None, min_length=1)
    timeout_s: float = Field(default=60.0, gt=0, le=3600, allow_inf_nan=False)
    """How long to wait for the server: to connect, and for each read of the answer."""
    max_retries: int = Field(default=3, ge=0, le=20)
    backoff_s: float = Field(default=0.5, ge=0, le=MAX_BACKOFF_S, allow_inf_nan=False)
    """The wait before the first retry; it doubles on each further one (with jitter)."""
    max_steps: int = Field(default=5, ge=1, le=100)
    """Model requests per sleeptime run."""
    temperature: float | None = Field(default=None, ge=0, le=2, allow_inf_nan=False)
    max_tokens: int | None = Field(default=None, ge=1)
    system: str | None = None
    """The instructions that open the system prompt (the memory blocks follow them)."""
    history_messages: int = Field(default=40, ge=0, le=10_000)
    """How many earlier messages of the conversation a primary agent sends."""
    proxy: str | None = None
    """An http:// proxy for this agent's requests, "" for none; by default the one the
    environment names (HTTPS_PROXY / HTTP_PROXY, NO_PROXY), never for a loopback server."""

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, url: str) -> str:
        if not url.startswith(("http://", "https://")):
            raise ValueError(
                "must be an http:// or https:// URL, e.g. http://127.0.0.1:11434/v1 for Ollama"
            )
        return url

    @field_validator("proxy")
    @classmethod
    def _http_proxy(cls, proxy: str | None) -> str | None:
        if proxy:
            Proxy.parse(proxy)  # ValueError says what is wrong
        return proxy

    @model_validator(mode="after")
    def _one_key_source(self) -> OpenAIConfig:
        if self.api_key is not None and self.api_key_env is not None:
            raise ValueError("give api_key or api_key_env, not both")
        return self


class ModelServerError(StepFailed):
    """A model request that failed for good: the text says what happened and what to check."""


class _Cancelled(Exception):
    """The run was cancelled while waiting to retry."""


def retry_delay(
    failure: ChatFailure, attempt: int, config: OpenAIConfig, jitter: float
) -> float | None:
    """Seconds to wait before retrying after the `attempt`-th failure (1 = the first), or
    None when it is not retried: out of retries, or an error that would only repeat.

    The delay is the server's `Retry-After` when it gives one, else `backoff_s` doubled per
    attempt with `jitter` (in [0, 1)) spreading it over its upper half; at most
    `MAX_BACKOFF_S` either way.

    >>> retry_delay(ServerStatus(429, "slow down", 2.5), 1, config, jitter=0.3)
    2.5
    """
    if attempt > config.max_retries:
        return None
    if isinstance(failure, ServerStatus):
        if failure.status < 500 and failure.status not in _RETRIED_STATUSES:
            return None
        if failure.retry_after is not None:
            return min(failure.retry_after, MAX_BACKOFF_S)
    elif not isinstance(failure, (ServerTimeout, ServerUnreachable)):
        return None
    backoff = min(config.backoff_s * 2.0 ** (attempt - 1), MAX_BACKOFF_S)
    return backoff * (0.5 + jitter / 2)


def request_outcome(failure: ChatFailure) -> str:
    """A failed request's outcome in a word, as metrics count it: `http_<status>`,
    `timeout`, `unreachable` or `malformed`.

    >>> request_outcome(ServerStatus(429, "slow down"))
    'http_429'
    """
    if isinstance(failure, ServerStatus):
        return f"http_{failure.status}"
    if isinstance(failure, ServerTimeout):
        return "timeout"
    if isinstance(failure, ServerUnreachable):
        return "unreachable"
    return "malformed"


def failure_text(failure: ChatFailure, attempts: int, config: OpenAIConfig) -> str:
    """What went wrong, for the run's error or the caller's exception."""
    tries = f"{attempts} attempt{'s' if attempts > 1 else ''}"
    if isinstance(failure, ServerStatus):
        hint = _HINTS.get(failure.status)
        verdict = (
            f"answered HTTP {failure.status} ({tries}, max_retries={config.max_retries})"
            if failure.status >= 500 or failure.status in _RETRIED_STATUSES
            else f"refused the request with HTTP {failure.status}"
        )
        text = f"the model server at {config.base_url} {verdict}: {failure.message}"
        return f"{text} ({hint})" if hint else text
    if isinstance(failure, ServerTimeout):
        return (
            f"the model server at {config.base_url} did not answer within "
            f"timeout_s={config.timeout_s:g} ({tries}): {failure}"
        )
    if isinstance(failure, ServerUnreachable):
        return f"could not reach the model server at {config.base_url} ({tries}): {failure}"
    return f"the model server at {config.base_url} sent a malformed answer: {failure}"


class OpenAIAgent:
    """An agent backed by an OpenAI-compatible chat-completions server.

    One HTTP client per agent, created on first use and kept for the agent's life, so
    connections are reused across steps (which may run on different threads). As a primary
    agent it serves one conversation, a turn at a time (as a group does), and keeps that
    conversation's recent messages between turns (see `RecentChat`).

    Example:
        >>> agent = OpenAIAgent({"base_url": "http://127.0.0.1:8000/v1", "model": "qwen2.5"})
    """

    agent_roles: ClassVar[tuple[AgentRole, ...]] = ("primary", "sleeptime")

    def __init__(self, config: Mapping[str, Any]) -> None:
        self.config = parse_config(OpenAIConfig, config)
        self._api_key = self.config.api_key
        if self.config.api_key_env is not None:
            self._api_key = os.environ.get(self.config.api_key_env)
            if not self._api_key:
                raise AgentConfigError(
                    KIND,
                    f"api_key_env names {self.config.api_key_env!r}, which is not set in "
                    "this process's environment: export it before starting the runtime, "
                    "or give api_key",
                )
        self._endpoint: ChatEndpoint | None = None
        self._recent = RecentChat(self.config.history_messages)
        self._lock = threading.Lock()
        self._random = random.Random()

    def step(
        self, context: AgentContext, messages: Sequence[Message | MessageCreate]
    ) -> list[MessageCreate] | StepResult:
        """Answer a turn (primary agent), or maintain memory from a transcript (sleeptime)."""
        if context.run_id is not None:
            return self._maintain_memory(context, messages)
        said = self._answer(context, messages, stream=False)
        return [] if said is None else [said]

    def stream(
        self, context: AgentContext, messages: Sequence[Message | MessageCreate]
    ) -> Iterator[MessageCreate]:
        """`step` over server-sent events; the message is yielded once it is complete."""
        if context.run_id is not None:
            output = self._maintain_memory(context, messages)
            yield from output.messages if isinstance(output, StepResult) else output
            return
        said = self._answer(context, messages, stream=True)
        if said is not None:
            yield said

    # -- the primary agent ----------------------------------------------------------------

    def _answer(
        self, context: AgentContext, messages: Sequence[Message | MessageCreate], stream: bool
    ) -> MessageCreate | None:
        config = self.config
        extra = [m.text() for m in messages if m.role == "system"]
        history = self._recent.before(messages, context.recent)
        chat = [
            {
                "role": "system",
                "content": system_prompt(
                    config.system or DEFAULT_PRIMARY_SYSTEM, context.memory.blocks, extra
                ),
            },
            *history,
            *chat_history(messages),
        ]
        try:
            answer = self._request(context, self._body(chat, stream=stream), stream, 1)
        except _Cancelled:
            self._recent.forget()
            raise ModelServerError("the turn was cancelled while waiting to retry") from None
        except BaseException:
            self._recent.forget()
            raise
        said = answer.message()
        self._recent.after(messages, said)
        return said

    # -- the sleeptime agent --------------------------------------------------------------

    def _maintain_memory(
        self, context: AgentContext, messages: Sequence[Message | MessageCreate]
    ) -> list[MessageCreate] | StepResult:
        config = self.config
        instructions = config.system or DEFAULT_SLEEPTIME_SYSTEM
        chat: list[dict[str, Any]] = [{"role": "system", "content": ""}, *chat_history(messages)]
        produced: list[MessageCreate] = []
        for step in range(1, config.max_steps + 1):
            if context.cancelled():
                return produced
            # The blocks as this run's own edits left them (no read from the store).
            chat[0]["content"] = system_prompt(instructions, context.memory.blocks)
            try:
                answer = self._request(context, self._body(chat, tools=True), False, step)
            except _Cancelled:
                return produced
            except ModelServerError as failure:
                failure.messages = list(produced)
                raise
            said = answer.message()
            if said is not None:
                produced.append(said)
            if not answer.tool_calls:
                return produced  # the model answered without a tool: it is done
            unknown = [call.name for call in answer.tool_calls if call.name not in TOOL_NAMES]
            if unknown:
                raise ModelServerError(
                    f"the model called {', '.join(map(repr, unknown))}, not one of its tools "
                    f"({', '.join(TOOL_NAMES)})",
                    messages=produced,
                )
            chat.append(answer.chat())
            finished = False
            for call in answer.tool_calls:
                if context.cancelled():
                    return produced
                try:
                    result = call_memory_tool(context.memory, call)
                except Exception as error:  # the edits made so far stay: so do their calls
                    raise StepFailed(describe(error), messages=produced) from error
                finished = finished or (call.name == FINISH and result.ok)
                reply = tool_message(call, result)
                produced.append(reply)
                chat.append({"role": "tool", "tool_call_id": call.id, "content": reply.content})
            if finished:
                return produced
        return StepResult(messages=produced, stop_reason=StopReason.MAX_STEPS)

    # -- requests -------------------------------------------------------------------------

    def _body(
        self, chat: list[dict[str, Any]], stream: bool = False, tools: bool = False
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.config.model, "messages": chat}
        if tools:
            body["tools"] = MEMORY_TOOLS
        if stream:
            body["stream"] = True
        if self.config.temperature is not None:
            body["temperature"] = self.config.temperature
        if self.config.max_tokens is not None:
            body["max_tokens"] = self.config.max_tokens
        return body

    def _request(
        self, context: AgentContext, body: dict[str, Any], stream: bool, step: int
    ) -> Answer:
        """One model request, retried as `retry_delay` says; raises ModelServerError."""
        endpoint = self._client()
        attempt = 0
        while True:
            attempt += 1
            request = context.observer.model_request(
                context.agent_id, context.group_id, context.run_id, self.config.model
            )
            with request:  # each attempt is a request of its own: timed, traced, counted
                try:
                    return _ask(endpoint, body, stream, step)
                except ChatFailure as failed:
                    request.failed(request_outcome(failed), failed)
                    failure = failed
            delay = retry_delay(failure, attempt, self.config, self._random.random())
            if delay is None:
                raise self._failed(context, failure, attempt) from failure
            log.info(
                "model_request_retried",
                agent_id=context.agent_id,
                run_id=context.run_id,
                attempt=attempt,
                delay_s=round(delay, 3),
                error=str(failure),
            )
            if context.wait(delay):
                raise _Cancelled from failure

    def _failed(self, context: AgentContext, failure: ChatFailure, attempts: int) -> Exception:
        text = failure_text(failure, attempts, self.config)
        log.warning(
            "model_request_failed", agent_id=context.agent_id, run_id=context.run_id, error=text
        )
        stop = StopReason.TIMEOUT if isinstance(failure, ServerTimeout) else StopReason.ERROR
        return ModelServerError(text, stop_reason=stop)

    def _client(self) -> ChatEndpoint:
        with self._lock:
            if self._endpoint is None:
                self._endpoint = ChatEndpoint(
                    self.config.base_url, self._api_key, self.config.timeout_s, self.config.proxy
                )
            return self._endpoint


def _ask(endpoint: ChatEndpoint, body: dict[str, Any], stream: bool, step: int) -> Answer:
    """One request and its answer, as JSON or as server-sent events; raises ChatFailure."""
    if not stream:
        return parse_completion(endpoint.complete(body), step)
    streamed = StreamedAnswer()
    for event in endpoint.stream(body):
        streamed.add(event)
    return streamed.answer(step)
