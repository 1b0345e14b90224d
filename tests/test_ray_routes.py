"""What a Ray client does after a call failed (`recourse`), and the shard hosts'
addresses: pure decisions, table-tested. And every error pickles as itself, fields and
all, since errors come back from shard hosts through Ray."""

from __future__ import annotations

import pickle

import pytest

pytest.importorskip("ray", reason="the ray extra is missing")

from ray.exceptions import ActorDiedError, ActorUnavailableError

from actors._ray_routes import (
    Backoff,
    HostGone,
    Recourse,
    ShardRoutes,
    host_address,
    parse_address,
    recourse,
)
from messages import (
    AgentRoleError,
    GroupBusy,
    GroupNotFound,
    NotOwner,
    PrimaryAgentError,
    RunsTimeout,
    RuntimeBusy,
    RuntimeFailed,
    RuntimeStopped,
    ShardLost,
    StoreUnavailable,
    TransitionRefused,
    TurnTimeout,
)

OWNER = host_address("sleeptime", "shard-host-1")


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (NotOwner("g", 3, "pid 7 on b", OWNER), Recourse.GO_TO_OWNER),
        (NotOwner("g", 3), Recourse.WAIT),  # moving: nobody holds it right now
        (NotOwner("g", 3, "pid 7 on b", "10.0.0.7:8000"), Recourse.WAIT),  # not a host
        (ShardLost(3), Recourse.WAIT),
        (RuntimeStopped(), Recourse.WAIT),  # the host is stopping, handing over
        (ActorDiedError(), Recourse.WAIT),
        (ActorUnavailableError("restarting", b"\0" * 16), Recourse.WAIT),
        (HostGone(OWNER), Recourse.WAIT),
        (GroupNotFound("g"), Recourse.GIVE_UP),
        (TurnTimeout("g", 1.0), Recourse.GIVE_UP),
        (PrimaryAgentError("g", "boom"), Recourse.GIVE_UP),
        (GroupBusy("g", 10), Recourse.GIVE_UP),
        (RuntimeBusy(10, 1.0), Recourse.GIVE_UP),
        (RuntimeFailed("crash loop"), Recourse.GIVE_UP),
        (StoreUnavailable("postgresql://db", "down"), Recourse.GIVE_UP),
        (ValueError("bad"), Recourse.GIVE_UP),
        (KeyboardInterrupt(), Recourse.GIVE_UP),
    ],
)
def test_what_a_client_does_after_a_failure(error: BaseException, expected: Recourse) -> None:
    assert recourse(error) is expected


def test_addresses_name_a_host_actor() -> None:
    assert parse_address(OWNER) == ("sleeptime", "shard-host-1")
    for other in (None, "", "ray:", "ray:sleeptime", "ray:/x", "http://h:1"):
        assert parse_address(other) is None


def test_routes_learn_per_shard_and_forget_a_failed_host() -> None:
    routes = ShardRoutes(shards=4)
    groups = [f"group-{n}" for n in range(40)]
    routes.learn(groups[0], OWNER)
    same_shard = [g for g in groups if routes.shard_of(g) == routes.shard_of(groups[0])]
    assert all(routes.owner(g) == OWNER for g in same_shard)
    other = next(g for g in groups if routes.shard_of(g) != routes.shard_of(groups[0]))
    assert routes.owner(other) is None
    routes.learn(other, "ray:sleeptime/shard-host-2")
    routes.forget_host(OWNER)
    assert routes.owner(groups[0]) is None and routes.owner(other) is not None


def test_backoff_doubles_up_to_its_cap_and_stops_at_the_deadline() -> None:
    backoff = Backoff.within(60)
    pauses = [backoff.next_pause() for _ in range(8)]
    assert pauses[:3] == [0.05, 0.1, 0.2] and max(p or 0 for p in pauses) == 1.0
    assert Backoff.within(0).next_pause() is None


@pytest.mark.parametrize(
    "error",
    [
        NotOwner("g", 3, "pid 7 on b", OWNER),
        ShardLost(3),
        PrimaryAgentError("g", "boom", result={"turn": 1}),
        RunsTimeout(["run-1", "run-2"], 2.5),
        TurnTimeout("g", 1.0),
        TransitionRefused("run-1", "running", "created", attempt=2),
        AgentRoleError("memory", "primary", ["sleeptime"]),
        GroupBusy("g", 10),
        RuntimeStopped(),
        HostGone(OWNER),
    ],
)
def test_every_error_pickles_as_itself(error: Exception) -> None:
    again = pickle.loads(pickle.dumps(error))
    assert type(again) is type(error) and str(again) == str(error)
    assert vars(again) == vars(error)
