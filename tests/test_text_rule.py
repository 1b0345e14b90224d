"""The text rule (issue 13, fault 5): stored text is valid Unicode without NUL.

No U+0000 and no code point in U+D800..U+DFFF, in messages, blocks, names, config and
memory tool arguments alike: refused at the boundary with a ValidationError (a memory
tool answers the agent with an error instead), nothing stored changes, and both backends
accept exactly the same text. A character outside the BMP, given as one code point, is
stored and read back exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from pydantic import ValidationError
from sqlalchemy import create_engine, insert
from sqlalchemy.pool import NullPool

from actors import AgentContext, PrimaryAgentError, Runtime
from messages import Message, MessageCreate, RunStatus, StopReason
from messages._ids import new_id
from persistence._engine import parse_url
from persistence._models import MessageRow, utcnow
from tests.agents import user
from tests.tables import TableDump

UNSTORABLE = {
    "NUL": "a\x00b",
    "lone high surrogate": "a\ud800b",
    "lone low surrogate": "\udfff",
    "surrogate pair": "\ud83d\ude00",
}
EMOJI = "I like \U0001f600 and \U00020000"  # non-BMP characters, each one code point


@pytest.fixture
def tables(db_url: str) -> Iterator[TableDump]:
    dump = TableDump(db_url)
    yield dump
    dump.close()


@pytest.fixture
def group_id(rt: Runtime) -> str:
    group = rt.create_group(primary={"kind": "scripted"}, sleeptime=[{"kind": "memory"}])
    rt.wait_for_runs(rt.step(group.id, [user("my name is Ada")]).run_ids, timeout=30)
    return group.id


def _message_with(text: str) -> list[dict[str, Any]]:
    """Each place a message holds text, with `text` in it."""
    call = {"id": "c1", "name": "memory_rethink"}
    return [
        {"role": "user", "content": text},
        {"role": "user", "content": [{"type": "text", "text": text}]},
        {"role": "assistant", "content": [{"type": "reasoning", "text": text}]},
        {"role": "user", "content": [{"type": "image", "url": text}]},
        {"role": "user", "content": [{"type": "image", "data": text, "media_type": "png"}]},
        {"role": "user", "content": "hi", "name": text},
        {"role": "assistant", "tool_calls": [{**call, "id": text}]},
        {"role": "assistant", "tool_calls": [{**call, "name": text}]},
        {"role": "assistant", "tool_calls": [{**call, "arguments": text}]},
        {"role": "assistant", "tool_calls": [{**call, "arguments": {"text": text}}]},
        {"role": "tool", "content": "{}", "tool_call_id": text},
    ]


TURNS: dict[str, Callable[[Runtime, str, list[Any]], object]] = {
    "step": lambda rt, g, m: rt.step(g, m),
    "record_turn": lambda rt, g, m: rt.record_turn(g, m),
    "stream": lambda rt, g, m: list(rt.stream(g, m)),
}


@pytest.mark.parametrize("text", UNSTORABLE.values(), ids=UNSTORABLE.keys())
@pytest.mark.parametrize("turn", TURNS.values(), ids=TURNS.keys())
def test_unstorable_text_in_a_message_is_refused(
    rt: Runtime,
    tables: TableDump,
    group_id: str,
    turn: Callable[[Runtime, str, list[Any]], object],
    text: str,
) -> None:
    before = tables.read()
    for message in _message_with(text):
        with pytest.raises(ValidationError, match=r"at index \d+"):
            turn(rt, group_id, [user("fine"), message])
    assert tables.read() == before


@pytest.mark.parametrize("text", UNSTORABLE.values(), ids=UNSTORABLE.keys())
def test_unstorable_text_in_a_group_is_refused(rt: Runtime, tables: TableDump, text: str) -> None:
    before = tables.read()
    bad_groups: list[dict[str, Any]] = [
        {"blocks": {"human": text}},
        {"blocks": {"human": {"value": text}}},
        {"blocks": {"human": {"value": "", "description": text}}},
        {"blocks": {text: ""}},
        {"preamble": text},
        {"primary": {"kind": "scripted", "name": text}},
        {"primary": {"kind": text}},
        {"sleeptime": [{"kind": "memory", "config": {"memory_persona": text}}]},
        {"primary": {"kind": "scripted", "config": {"replies": [text]}}},
        {"primary": {"kind": "simulated", "config": {text: 1}}},
        {"primary": {"kind": "simulated", "config": {"reply": {"deep": [text]}}}},
    ]
    for changes in bad_groups:
        arguments = {"primary": {"kind": "scripted"}, "sleeptime": [{"kind": "memory"}]}
        with pytest.raises(ValidationError):
            rt.create_group(**{**arguments, **changes})
    assert tables.read() == before


@pytest.mark.parametrize("text", UNSTORABLE.values(), ids=UNSTORABLE.keys())
def test_unstorable_ids_are_refused(rt: Runtime, text: str) -> None:
    lookups: list[Callable[[str], object]] = [
        rt.get_group,
        rt.get_run,
        rt.run_events,
        rt.cancel_run,
        rt.get_agent,
        rt.get_blocks,
        rt.list_messages,
        lambda i: rt.update_group(i, frequency=1),
        lambda i: rt.list_runs(agent_id=i),
        lambda i: rt.count_runs(group_id=i),
        lambda i: rt.wait_for_runs([i], timeout=1),
        lambda i: rt.step(i, [user("hi")]),
        lambda i: rt.stream(i, [user("hi")]),
    ]
    for lookup in lookups:
        with pytest.raises(ValidationError, match=r"at index \d+"):
            lookup(f"group-{text}")


class Scribbler:
    """A sleeptime agent that gives each memory tool every unstorable text."""

    def __init__(self, config: dict[str, Any]) -> None:
        pass

    def step(self, context: AgentContext, messages: list[Message]) -> list[MessageCreate]:
        memory = context.memory
        results = []
        for text in UNSTORABLE.values():
            results += [
                memory.memory_rethink("human", text),
                memory.memory_insert("human", text),
                memory.memory_replace("human", "name: Ada", text),
                memory.memory_replace("human", text, "x"),
            ]
        assert not any(r.ok for r in results), results
        return [MessageCreate(role="assistant", content="\n".join(r.message for r in results))]


def test_memory_tools_answer_unstorable_text_with_an_error(db_url: str) -> None:
    with Runtime.start(db_url, kinds={"scribbler": Scribbler}) as rt:
        group = rt.create_group(
            primary={"kind": "scripted"},
            sleeptime=[{"kind": "scribbler"}],
            blocks={"human": "name: Ada"},
        )
        (run,) = rt.wait_for_runs(rt.step(group.id, [user("hello")]).run_ids, timeout=30)
        assert (run.status, run.stop_reason) == (RunStatus.COMPLETED, StopReason.END_TURN)
        assert rt.get_blocks(group.primary_agent_id)["human"].value == "name: Ada"
        answer = rt.list_messages(group.sleeptime_agent_ids[0])[-1].text()
        assert answer.count("cannot go into a memory block") == 4 * len(UNSTORABLE)
        assert "NUL character (U+0000) at index 1" in answer
        assert "surrogate code point (U+D83D) at index 0" in answer


class Leaky:
    """An agent whose output or error holds text no database stores."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.raises = bool(config.get("raises"))

    def step(self, context: AgentContext, messages: list[Message]) -> list[dict[str, Any]]:
        if self.raises:
            raise RuntimeError("broke on a\x00b and \ud800")
        return [{"role": "assistant", "content": "a\x00b"}]


@pytest.mark.parametrize("raises", [False, True], ids=["bad output", "bad error text"])
def test_a_run_with_unstorable_output_still_ends(db_url: str, raises: bool) -> None:
    with Runtime.start(db_url, kinds={"leaky": Leaky}) as rt:
        group = rt.create_group(
            primary={"kind": "scripted"},
            sleeptime=[{"kind": "leaky", "config": {"raises": raises}}],
        )
        (run,) = rt.wait_for_runs(rt.step(group.id, [user("hello")]).run_ids, timeout=30)
        assert (run.status, run.stop_reason) == (RunStatus.FAILED, StopReason.ERROR)
        expected = r"broke on a\x00b and \ud800" if raises else "NUL character (U+0000)"
        assert expected in (run.error or "")  # an unstorable error text is stored escaped


def test_a_primary_agent_with_unstorable_output_fails_its_turn_clearly(db_url: str) -> None:
    with Runtime.start(db_url, kinds={"leaky": Leaky}) as rt:
        group = rt.create_group(primary={"kind": "leaky"}, sleeptime=[{"kind": "memory"}])
        with pytest.raises(PrimaryAgentError, match=r"NUL character \(U\+0000\) at index 1"):
            rt.step(group.id, [user("hello")])
        assert rt.get_group(group.id).turns == 1  # the turn (its input) is still recorded


def test_non_bmp_text_is_stored_and_read_back_exactly(rt: Runtime) -> None:
    group = rt.create_group(
        primary={"kind": "scripted", "name": EMOJI},
        sleeptime=[{"kind": "memory", "config": {"memory_persona": EMOJI}}],
        blocks={"human": "", "persona": EMOJI},
        preamble=EMOJI,
    )
    said = [
        MessageCreate(role="user", content=EMOJI, name=EMOJI),
        MessageCreate(role="user", content="my favorite emoji is \U0001f600"),
        MessageCreate(role="assistant", content=[{"type": "reasoning", "text": EMOJI}]),
    ]
    rt.wait_for_runs(rt.record_turn(group.id, said).run_ids, timeout=30)
    stored = rt.list_messages(group.primary_agent_id)
    assert [m.content for m in stored] == [m.parts() for m in said]
    assert stored[0].name == EMOJI
    assert rt.get_agent(group.primary_agent_id).name == EMOJI
    assert rt.get_group(group.id).preamble == EMOJI
    blocks = rt.get_blocks(group.sleeptime_agent_ids[0])
    assert (blocks["persona"].value, blocks["memory_persona"].value) == (EMOJI, EMOJI)
    assert blocks["human"].value == "favorite emoji: \U0001f600"  # written by a memory tool


def test_rows_stored_before_the_rule_are_still_readable(rt: Runtime, db_url: str) -> None:
    group = rt.create_group(primary={"kind": "scripted"}, sleeptime=[{"kind": "memory"}])
    engine = create_engine(parse_url(db_url), poolclass=NullPool)
    old = {"type": "text", "text": "from an older version: a\x00b"}
    with engine.begin() as connection:  # PostgreSQL's json type takes "\u0000" too
        connection.execute(
            insert(MessageRow).values(
                id=new_id("message"),
                agent_id=group.primary_agent_id,
                group_id=group.id,
                sequence=1,
                role="user",
                content=[old],
                created_at=utcnow(),
            )
        )
    engine.dispose()
    (message,) = rt.list_messages(group.primary_agent_id)
    assert message.text() == old["text"]
