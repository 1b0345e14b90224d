"""The pykka internals that supervision relies on are there, and only `_pykka.py` uses them.

If this fails after a pykka upgrade, read the message: it names what is gone. Adapt
`actors/_pykka.py` (the one module that touches pykka's internals) and the pin in
`pyproject.toml`, which says which versions it was tested on.
"""

from __future__ import annotations

import ast
import re
import threading
import tomllib
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pykka
import pykka.messages
import pytest

import actors
from actors import _pykka
from actors._pykka import TESTED_PYKKA, check_pykka, drain_inbox, missing_internals, stop_now

ROOT = Path(__file__).resolve().parent.parent


def test_the_installed_pykka_has_every_internal_supervision_uses() -> None:
    missing = missing_internals()
    assert not missing, (
        f"pykka {version('pykka')} lacks what actors/_pykka.py relies on: {missing}; "
        f"it was tested on pykka{TESTED_PYKKA}"
    )
    actor = pykka.ThreadingActor()
    assert callable(actor.actor_inbox.get) and callable(actor.actor_inbox.empty)
    assert callable(actor._stop)


def test_a_missing_internal_is_named_at_import(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(pykka.messages, "_ActorStop")
    monkeypatch.delattr(pykka.Actor, "_stop")
    with pytest.raises(ImportError, match=r"_ActorStop.*_stop\(\)") as error:
        check_pykka()
    assert f"pykka{TESTED_PYKKA}" in str(error.value)


def test_the_pin_is_the_tested_range_and_the_installed_pykka_is_in_it() -> None:
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert f"pykka{TESTED_PYKKA}" in dependencies
    low, high = re.fullmatch(r">=([\d.]+),<([\d.]+)", TESTED_PYKKA).groups()  # type: ignore[union-attr]
    installed = tuple(int(part) for part in version("pykka").split(".")[:2])

    def parsed(text: str) -> tuple[int, ...]:
        return tuple(int(part) for part in text.split("."))

    assert parsed(low) <= installed < parsed(high)


class _Idle(pykka.ThreadingActor):
    pass


def test_draining_an_inbox_keeps_the_messages_in_order_and_answers_a_stop() -> None:
    actor = _Idle()  # never started: what is told stays in its inbox
    actor.actor_ref.tell("first")
    stopped = actor.actor_ref.stop(block=False)
    actor.actor_ref.tell("second")
    assert drain_inbox(actor.actor_inbox) == ["first", "second"]
    assert stopped.get(timeout=5) is True  # whoever asked it to stop is not left waiting
    assert actor.actor_inbox.empty()


class _StopsAtOnce(pykka.ThreadingActor):
    def __init__(self, handled: list[Any], gate: threading.Event) -> None:
        super().__init__()
        self.handled = handled
        self.gate = gate

    def on_receive(self, message: Any) -> Any:
        self.gate.wait(5)  # everything below is queued before the first is handled
        self.handled.append(message)
        if message == "stop":
            stop_now(self)


def test_stopping_at_once_handles_nothing_more() -> None:
    handled: list[Any] = []
    gate = threading.Event()
    ref = _StopsAtOnce.start(handled, gate)
    ref.tell("stop")
    ref.tell("never")
    gate.set()
    ref.actor_stopped.wait(5)
    assert handled == ["stop"]
    assert not ref.is_alive()


def test_no_other_module_touches_pykka_internals() -> None:
    touching = set()
    for path in Path(actors.__file__).parent.rglob("*.py"):
        source = path.read_text()
        tree = ast.parse(source)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pykka"):
                private = (node.module or "").startswith("pykka._") or any(
                    alias.name.startswith("_") for alias in node.names
                )
                if private or node.module == "pykka.messages":
                    touching.add(path.name)
            if isinstance(node, ast.Attribute) and node.attr in {"_stop", "_actor"}:
                touching.add(path.name)
        if "actor_inbox.get" in source or "envelope" in source.lower():
            touching.add(path.name)
    assert touching <= {Path(_pykka.__file__).name}, touching
