"""Admission (actors/_admission.py): the bounds on turns in flight and queued per group.

The decision is a table; the tickets are checked against a model under any sequence of
admissions, withdrawals, sends and ends (hypothesis): no place and no permit is ever lost
or given twice, and permits go to the waiters in the order they came.
"""

from __future__ import annotations

import functools
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from actors._admission import TurnAdmission, TurnTicket, Verdict, decide_admission, permit_wait
from messages import GroupBusy


@pytest.mark.parametrize(
    ("queued", "in_flight", "max_queued", "max_in_flight", "verdict"),
    [
        (0, 0, None, None, Verdict.GRANTED),
        (999, 999, None, None, Verdict.GRANTED),
        (0, 0, 1, 1, Verdict.GRANTED),
        (1, 0, 1, 5, Verdict.BUSY),  # the group is full, whatever the permits
        (0, 5, 1, 5, Verdict.WAIT),
        (2, 5, 2, 5, Verdict.BUSY),
        (1, 4, 2, 5, Verdict.GRANTED),
        (1, 5, 2, None, Verdict.GRANTED),
        (5, 5, None, 5, Verdict.WAIT),
    ],
)
def test_decide_admission(
    queued: int, in_flight: int, max_queued: int | None, max_in_flight: int | None, verdict: Verdict
) -> None:
    assert decide_admission(queued, in_flight, max_queued, max_in_flight) is verdict


def test_permit_wait_is_the_permit_timeout_cut_to_the_callers_deadline() -> None:
    assert permit_wait(None, None) is None
    assert permit_wait(30.0, None) == 30.0
    assert permit_wait(None, 0.0) == 0.0  # a deadline long past
    wait = permit_wait(30.0, float("inf"))
    assert wait == 30.0
    cut = permit_wait(30.0, time.monotonic() + 1.0)
    assert cut is not None and 0.5 < cut <= 1.0


def test_a_freed_permit_goes_to_the_oldest_waiter_and_calls_it_back() -> None:
    admission = TurnAdmission(max_in_flight=1, max_queued=None, permit_timeout=None)
    holder = admission.admit("a")
    first, second = admission.admit("b"), admission.admit("c")
    told: list[str] = []
    second.when_granted(lambda: told.append("c"))
    first.when_granted(lambda: told.append("b"))
    assert holder.granted and not first.granted and not second.granted
    assert holder.send()
    holder.end()
    assert told == ["b"] and first.granted and not second.granted
    first.withdraw()  # granted, not sent: its permit goes on
    assert told == ["b", "c"] and second.granted
    assert admission.counts() == {"turns_in_flight": 1, "turns_waiting": 0}


def test_a_sent_ticket_is_freed_only_by_its_end() -> None:
    admission = TurnAdmission(max_in_flight=1, max_queued=1, permit_timeout=None)
    ticket = admission.admit("a")
    assert ticket.send() and ticket.send()  # sending twice changes nothing
    ticket.withdraw()  # its caller gave up: the turn goes on, and keeps its place
    assert admission.queued("a") == 1
    with pytest.raises(GroupBusy):
        admission.admit("a")
    ticket.end()
    ticket.end()
    assert admission.queued("a") == 0
    assert admission.counts() == {"turns_in_flight": 0, "turns_waiting": 0}


def test_a_withdrawn_ticket_cannot_be_sent_and_is_skipped() -> None:
    admission = TurnAdmission(max_in_flight=1, max_queued=None, permit_timeout=None)
    holder = admission.admit("a")
    gone, next_one = admission.admit("a"), admission.admit("b")
    gone.withdraw()
    assert not gone.send()
    assert admission.counts() == {"turns_in_flight": 1, "turns_waiting": 1}
    holder.send()
    holder.end()
    assert next_one.granted and not gone.granted


def test_a_waiting_thread_is_woken_by_the_end_of_a_turn() -> None:
    admission = TurnAdmission(max_in_flight=1, max_queued=None, permit_timeout=None)
    holder = admission.admit("a")
    holder.send()
    waiter = admission.admit("b")
    woken = threading.Event()
    waiter.when_granted(woken.set)
    ender = threading.Thread(target=holder.end)
    ender.start()
    assert woken.wait(10)
    ender.join(10)


Op = tuple[str, int]


@settings(max_examples=300, deadline=None)
@given(
    max_in_flight=st.one_of(st.none(), st.integers(1, 3)),
    max_queued=st.one_of(st.none(), st.integers(1, 3)),
    ops=st.lists(
        st.tuples(st.sampled_from(["admit", "send", "withdraw", "end"]), st.integers(0, 20)),
        max_size=60,
    ),
)
def test_no_place_or_permit_is_ever_lost_or_given_twice(
    max_in_flight: int | None, max_queued: int | None, ops: list[Op]
) -> None:
    admission = TurnAdmission(max_in_flight, max_queued, permit_timeout=None)
    tickets: list[TurnTicket] = []
    live: dict[int, str] = {}  # ticket index -> "waiting", "granted" or "sent"
    line: list[int] = []  # waiting tickets, oldest first
    granted_order: list[int] = []
    for op, pick in ops:
        if op == "admit":
            group = f"g{pick % 2}"
            in_group = sum(1 for i in live if tickets[i].group_id == group)
            if max_queued is not None and in_group >= max_queued:
                with pytest.raises(GroupBusy):
                    admission.admit(group)
                continue
            ticket = admission.admit(group)
            index = len(tickets)
            tickets.append(ticket)
            ticket.when_granted(functools.partial(granted_order.append, index))
            held = sum(1 for state in live.values() if state != "waiting")
            free = max_in_flight is None or held < max_in_flight
            live[index] = "granted" if free else "waiting"
            if not free:
                line.append(index)
            continue
        if not tickets:
            continue
        index = pick % len(tickets)
        ticket, state = tickets[index], live.get(index)
        if op == "send":
            assert ticket.send() == (state in ("granted", "sent"))
            if state == "granted":
                live[index] = "sent"
            continue
        frees = (op == "withdraw" and state in ("waiting", "granted")) or (
            op == "end" and state == "sent"
        )
        (ticket.withdraw if op == "withdraw" else ticket.end)()
        if not frees:
            continue
        del live[index]
        if state == "waiting":
            line.remove(index)
        elif line:
            live[line.pop(0)] = "granted"  # the oldest waiter takes the permit
    holding = [i for i, s in live.items() if s != "waiting"]
    assert admission.counts() == {"turns_in_flight": len(holding), "turns_waiting": len(line)}
    for group in ("g0", "g1"):
        assert admission.queued(group) == sum(1 for i in live if tickets[i].group_id == group)
    assert sorted(i for i in granted_order if i in live) == sorted(holding)  # each once
    assert [i for i in granted_order if i in line] == []  # never one still waiting
    assert granted_order == sorted(granted_order)  # first come, first served
    assert all(
        tickets[i].granted == (live.get(i) in ("granted", "sent")) for i in range(len(tickets))
    )
