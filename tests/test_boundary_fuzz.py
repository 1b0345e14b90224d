"""A fuzz of the public API's arguments (issue 13, fault 10), on SQLite and PostgreSQL at once.

Each example calls one Runtime method (or `Runtime.start`) with wrong types and edge values
in one or two of its arguments, on one runtime per backend. Only a ValidationError or a
SleeptimeError may come out; a refused call leaves every table as it was; and both backends
give the same verdict (accepted, or refused with the same error class) for the same input.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from actors import Runtime
from messages import RunStatus, SleeptimeError
from messages._text import INT32_MAX
from tests.agents import Echo, user
from tests.postgres import PostgresCluster
from tests.tables import TableDump

FUZZ = settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@dataclass(frozen=True)
class Ref:
    """A stored object's id, which differs per backend: resolved for each runtime."""

    name: str


GROUP, PRIMARY, SLEEPER, RUN = Ref("group"), Ref("primary"), Ref("sleeper"), Ref("run")

WILD_VALUES: list[Any] = [
    None, True, False, 0, 1, -1, 7, INT32_MAX, INT32_MAX + 1, 2**63, -(2**63) - 1, 2**64,
    0.5, -0.0, 1e308, math.nan, math.inf, -math.inf, b"bytes", bytearray(b"x"),
    "", "x", "created", "human", "human\n", "x" * 6000,
    "x" * 64, "x" * 65, "x" * 100, "x" * 101, "x" * 200, "x" * 201,  # column lengths
    "a\x00b", "\ud800", "\udfff", "\ud83d\ude00", "\U0001f600", "group-\x00",
    [], {}, [1], ["x"], [None], {"a": 1}, {"a": object()}, {1: "x"}, (1,), {1, 2},
    object(), print, Echo, RunStatus.CREATED, GROUP, RUN, [RUN], [GROUP],
]  # fmt: skip
_odd_text = st.text(st.sampled_from("a \x00\ud800\udc00\U0001f600\n"), max_size=8)
WILD = st.one_of(
    st.sampled_from(WILD_VALUES),
    st.integers(),
    st.floats(),
    _odd_text,
    st.lists(st.sampled_from([None, 1, "x", 2.5]), max_size=3),
)

# Where a wild value may also hide inside an otherwise valid argument.
NESTED: dict[str, list[Callable[[Any], Any]]] = {
    "messages": [
        lambda w: [w],
        lambda w: [{"role": "user", "content": w}],
        lambda w: [{"role": "user", "content": [{"type": "text", "text": w}]}],
        lambda w: [{"role": "user", "content": "hi", "name": w}],
        lambda w: [{"role": w, "content": "hi"}],
        lambda w: [{"role": "assistant", "tool_calls": [{"id": w, "name": "f"}]}],
        lambda w: [{"role": "assistant", "tool_calls": [{"id": "c", "name": "f", "arguments": w}]}],
        lambda w: [{"role": "tool", "content": "{}", "tool_call_id": w}],
    ],
    "primary": [
        lambda w: {"kind": w},
        lambda w: {"kind": "scripted", "name": w},
        lambda w: {"kind": "scripted", "config": w},
        lambda w: {"kind": "scripted", "config": {"replies": [w]}},
        lambda w: {"kind": "simulated", "config": {"seed": w}},
        lambda w: {"kind": "fuzzed", "config": {"anything": w}},
    ],
    "sleeptime": [
        lambda w: [w],
        lambda w: [{"kind": "memory", "config": {"memory_persona": w}}],
        lambda w: [{"kind": "memory", "name": w}],
        lambda w: [{"kind": "fuzzed", "config": {"nested": {"list": [w]}}}],
    ],
    "blocks": [
        lambda w: {"human": w},
        lambda w: {"human": {"value": "", "limit": w}},
        lambda w: {"human": {"value": "", "read_only": w}},
        lambda w: {"human": {"value": "", "description": w}},
    ],
    "run_ids": [lambda w: [w], lambda w: [RUN, w]],
    "statuses": [lambda w: [w]],
    "group_ids": [lambda w: [w]],
}

_TURN = {"group_id": GROUP, "messages": [{"role": "user", "content": "hi"}]}
# Each public method with valid arguments; a call replaces one or two of them.
CALLS: dict[str, tuple[Callable[..., Any], dict[str, Any]]] = {
    "create_group": (
        lambda rt, **a: rt.create_group(**a),
        {
            "primary": {"kind": "scripted"},
            "sleeptime": [{"kind": "memory"}],
            "frequency": 0,
            "blocks": None,
            "preamble": None,
            "transcript_max_messages": None,
            "run_timeout": 600.0,
            "max_attempts": 3,
        },
    ),
    "update_group": (lambda rt, **a: rt.update_group(**a), {"group_id": GROUP, "frequency": 0}),
    "step": (lambda rt, **a: rt.step(**a), _TURN),
    "record_turn": (lambda rt, **a: rt.record_turn(**a), _TURN),
    "stream": (lambda rt, **a: list(rt.stream(**a)), _TURN),
    "get_group": (lambda rt, **a: rt.get_group(**a), {"group_id": GROUP}),
    "get_run": (lambda rt, **a: rt.get_run(**a), {"run_id": RUN}),
    "run_events": (lambda rt, **a: rt.run_events(**a), {"run_id": RUN}),
    "cancel_run": (lambda rt, **a: rt.cancel_run(**a), {"run_id": RUN}),
    "get_agent": (lambda rt, **a: rt.get_agent(**a), {"agent_id": PRIMARY}),
    "get_blocks": (lambda rt, **a: rt.get_blocks(**a), {"agent_id": SLEEPER}),
    "list_messages": (lambda rt, **a: rt.list_messages(**a), {"agent_id": PRIMARY}),
    "list_runs": (
        lambda rt, **a: rt.list_runs(**a),
        {
            "agent_id": None,
            "group_id": GROUP,
            "statuses": None,
            "limit": None,
            "newest_first": False,
        },
    ),
    "count_runs": (
        lambda rt, **a: rt.count_runs(**a),
        {"agent_id": SLEEPER, "group_id": None, "statuses": ["completed"]},
    ),
    "wait_for_runs": (lambda rt, **a: rt.wait_for_runs(**a), {"run_ids": [RUN], "timeout": 5}),
    "check_invariants": (lambda rt, **a: rt.check_invariants(**a), {"group_ids": [GROUP]}),
    "register": (
        lambda rt, **a: rt.agents.register(**a),
        {"kind": "fuzzed", "factory": Echo, "roles": None},
    ),
}


def _argument(name: str) -> st.SearchStrategy[Any]:
    return st.one_of(WILD, *(WILD.map(shape) for shape in NESTED.get(name, [])))


@st.composite
def calls(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
    """A method name and its arguments, one or two of them wild."""
    method = draw(st.sampled_from(sorted(CALLS)))
    arguments = dict(CALLS[method][1])
    for name in draw(st.lists(st.sampled_from(sorted(arguments)), min_size=1, max_size=2)):
        arguments[name] = draw(_argument(name))
    return method, arguments


def _resolve(value: Any, ids: dict[str, str]) -> Any:
    if isinstance(value, Ref):
        return ids[value.name]
    if isinstance(value, list):
        return [_resolve(v, ids) for v in value]
    if isinstance(value, dict):
        return {k: _resolve(v, ids) for k, v in value.items()}
    return value


@dataclass
class Backend:
    """One runtime under fuzz, the ids its Refs stand for, and a reader of its tables."""

    rt: Runtime
    ids: dict[str, str]
    tables: TableDump

    def call(self, method: str, arguments: dict[str, Any]) -> str:
        """The verdict: "accepted", or the class of the typed error that refused the call."""
        before = self.tables.read()
        try:
            CALLS[method][0](self.rt, **_resolve(arguments, self.ids))
        except (ValidationError, SleeptimeError) as refused:
            assert self.tables.read() == before, f"{method} refused, yet the tables changed"
            return type(refused).__name__
        self._settle()
        return "accepted"

    def _settle(self) -> None:
        """Wait for the runs an accepted turn started: the next call starts from rest."""
        open_runs = self.rt.list_runs(statuses=[RunStatus.CREATED, RunStatus.RUNNING])
        self.rt.wait_for_runs([run.id for run in open_runs], timeout=30)


def _backend(url: str) -> Backend:
    rt = Runtime.start(url, kinds={"fuzzed": Echo}, workers=2)
    group = rt.create_group(primary={"kind": "scripted"}, sleeptime=[{"kind": "memory"}])
    (run_id,) = rt.step(group.id, [user("my name is Ada")]).run_ids
    rt.wait_for_runs([run_id], timeout=30)
    rt.update_group(group.id, frequency=0)  # later turns fire only if a call changes it
    ids = {
        "group": group.id,
        "primary": group.primary_agent_id,
        "sleeper": group.sleeptime_agent_ids[0],
        "run": run_id,
    }
    return Backend(rt, ids, TableDump(url))


@pytest.fixture
def urls(tmp_path: Path, postgres_cluster: PostgresCluster) -> Iterator[dict[str, str]]:
    """One empty database per backend."""
    name = postgres_cluster.create_database("fuzz")
    try:
        yield {
            "sqlite": f"sqlite:///{tmp_path / 'fuzz.db'}",
            "postgresql": postgres_cluster.url(name),
        }
    finally:
        postgres_cluster.drop_database(name)


def test_api_calls_get_typed_errors_and_the_same_verdict_on_both_backends(
    urls: dict[str, str],
) -> None:
    backends = {name: _backend(url) for name, url in urls.items()}
    seen: Counter[str] = Counter()

    @FUZZ
    @given(call=calls())
    def check(call: tuple[str, dict[str, Any]]) -> None:
        method, arguments = call
        verdicts = {name: b.call(method, arguments) for name, b in backends.items()}
        assert len(set(verdicts.values())) == 1, f"{method}({arguments!r}): {verdicts}"
        seen[verdicts["sqlite"]] += 1

    try:
        check()
    finally:
        for backend in backends.values():
            backend.rt.stop(drain_timeout=5)
            backend.tables.close()
    assert seen["accepted"] and seen["ValidationError"], seen  # both verdicts were compared


START_DEFAULTS: dict[str, Any] = {
    "kinds": None,
    "workers": 2,
    "read_only": False,
    "auto_upgrade": True,
    "chaos": None,
    "restart_policy": None,
    "passivate_after": 300.0,
    "max_active_groups": 256,
}
START_NESTED: dict[str, list[Callable[[Any], Any]]] = {
    "kinds": [lambda w: {"k": w}, lambda w: {w: Echo} if isinstance(w, str) else {"k": w}],
}


@st.composite
def start_options(draw: st.DrawFn) -> dict[str, Any]:
    """Runtime.start options, one of them wild."""
    name = draw(st.sampled_from([*sorted(START_DEFAULTS), "url"]))
    shapes = START_NESTED.get(name, [])
    return {name: draw(st.one_of(WILD, *(WILD.map(shape) for shape in shapes)))}


def _start(url: str, options: dict[str, Any], tables: TableDump) -> str:
    before = tables.read()
    try:
        rt = Runtime.start(**{"url": url, **START_DEFAULTS, **options})
    except (ValidationError, SleeptimeError) as refused:
        assert tables.read() == before, f"Runtime.start refused {options!r}, yet tables changed"
        return type(refused).__name__
    rt.stop(drain_timeout=0)
    return "accepted"


def test_start_options_get_typed_errors_and_the_same_verdict_on_both_backends(
    urls: dict[str, str],
) -> None:
    tables = {name: TableDump(url) for name, url in urls.items()}
    for url in urls.values():  # the schema, so that a refused start has tables to compare
        Runtime.start(url).stop()

    seen: Counter[str] = Counter()

    @settings(FUZZ, max_examples=60)
    @given(options=start_options())
    def check(options: dict[str, Any]) -> None:
        verdicts = {name: _start(url, options, tables[name]) for name, url in urls.items()}
        assert len(set(verdicts.values())) == 1, f"Runtime.start({options!r}): {verdicts}"
        seen[verdicts["sqlite"]] += 1

    try:
        check()
    finally:
        for dump in tables.values():
            dump.close()
    assert seen["accepted"] and seen["ValidationError"], seen
