"""The lock-free tally scrapes as prometheus_client's own Counter and Histogram do.

`actors/_tally.py` replaces `prometheus_client`'s instruments on the hot path: for any
observations, its families must be the ones those instruments yield (names, labels,
buckets, counts, sums; the `_created` times only present), and a scrape must see every
observation made before it, from any number of threads.
"""

from __future__ import annotations

import math
import threading

from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from actors._tally import FOLD_AT, Tally

BUCKETS = (0.001, 0.01, 0.5, 1.0, 2.5, 10.0)
LABELS = st.sampled_from([("completed", "end_turn"), ("failed", "error"), ("x y", 'é"\\')])
AMOUNTS = st.floats(min_value=0, max_value=50, allow_nan=False) | st.sampled_from(BUCKETS)


def samples(registry: CollectorRegistry) -> list[tuple[str, dict[str, str], float]]:
    """Every sample but the `_created` times' values (only their series are compared)."""
    found = []
    for family in registry.collect():
        for sample in family.samples:
            created = sample.name.endswith("_created")
            found.append((sample.name, sample.labels, 0.0 if created else sample.value))
    return sorted(found, key=lambda s: (s[0], sorted(s[1].items())))


Sampled = list[tuple[str, dict[str, str], float]]


def close(a: Sampled, b: Sampled) -> bool:
    return len(a) == len(b) and all(
        x[:2] == y[:2] and math.isclose(x[2], y[2], rel_tol=1e-9, abs_tol=1e-9)
        for x, y in zip(a, b, strict=True)
    )


@settings(max_examples=60, deadline=None)
@given(
    counts=st.lists(st.tuples(LABELS, st.integers(0, 5)), max_size=30),
    observed=st.lists(st.tuples(st.sampled_from(["ok", "timeout"]), AMOUNTS), max_size=60),
    plain=st.lists(AMOUNTS, max_size=30),
)
def test_families_are_prometheus_clients_own(
    counts: list[tuple[tuple[str, str], int]],
    observed: list[tuple[str, float]],
    plain: list[float],
) -> None:
    theirs, ours = CollectorRegistry(), CollectorRegistry()
    ended = Counter("t_ended", "Ended.", ["status", "reason"], registry=theirs)
    requeued = Counter("t_requeued", "Requeued.", registry=theirs)
    fired = Counter("t_turns", "Turns.", ["fired"], registry=theirs)
    fired.labels("true")
    fired.labels("false")
    timed = Histogram("t_seconds", "Seconds.", ["outcome"], buckets=BUCKETS, registry=theirs)
    sizes = Histogram("t_sizes", "Sizes.", buckets=BUCKETS, registry=theirs)

    tally = Tally()
    t_ended = tally.counter("t_ended", "Ended.", ["status", "reason"])
    t_requeued = tally.counter("t_requeued", "Requeued.")
    tally.counter("t_turns", "Turns.", ["fired"], children=[("true",), ("false",)])
    t_timed = tally.histogram("t_seconds", "Seconds.", BUCKETS, ["outcome"])
    t_sizes = tally.histogram("t_sizes", "Sizes.", BUCKETS)
    ours.register(tally)

    for labels, amount in counts:
        ended.labels(*labels).inc(amount)
        tally.observe(t_ended, labels, amount)
        requeued.inc()
        tally.observe(t_requeued, (), 1)
    for outcome, seconds in observed:
        timed.labels(outcome).observe(seconds)
        tally.observe(t_timed, (outcome,), seconds)
    for size in plain:
        sizes.observe(size)
        tally.observe(t_sizes, (), size)

    assert close(samples(ours), samples(theirs))
    text = generate_latest(ours).decode()
    expected = generate_latest(theirs).decode()
    assert _uncreated(text) == _uncreated(expected)


def _uncreated(text: str) -> list[str]:
    return [line for line in text.splitlines() if "_created" not in line]


def test_a_name_a_registry_holds_already_is_refused_as_prometheus_clients_is() -> None:
    registry = CollectorRegistry()
    Counter("t_turns", "Turns.", registry=registry)
    tally = Tally()
    tally.counter("t_turns", "Turns.")
    try:
        registry.register(tally)
    except ValueError as error:
        assert "t_turns" in str(error)
    else:
        raise AssertionError("a duplicated name was registered")


def test_a_scrape_sees_every_observation_made_before_it_from_many_threads() -> None:
    tally = Tally()
    counter = tally.counter("t_calls", "Calls.", ["thread"])
    histogram = tally.histogram("t_seconds", "Seconds.", BUCKETS)
    registry = CollectorRegistry()
    registry.register(tally)
    threads, each = 8, 3 * FOLD_AT // 2  # past the fold threshold, several times
    start = threading.Barrier(threads + 1)

    def work(number: int) -> None:
        start.wait(timeout=10)
        for _ in range(each):
            tally.observe(counter, (str(number),), 1)
            tally.observe(histogram, (), 0.5)

    workers = [threading.Thread(target=work, args=(n,)) for n in range(threads)]
    for worker in workers:
        worker.start()
    start.wait(timeout=10)
    seen: list[float] = []
    while any(w.is_alive() for w in workers):  # scrapes meanwhile never go backwards
        value = registry.get_sample_value("t_seconds_count") or 0.0
        assert not seen or value >= seen[-1]
        seen.append(value)
    for worker in workers:
        worker.join(timeout=30)
    for number in range(threads):
        assert registry.get_sample_value("t_calls_total", {"thread": str(number)}) == each
    assert registry.get_sample_value("t_seconds_count") == threads * each
    assert registry.get_sample_value("t_seconds_sum") == threads * each * 0.5


def test_unscraped_observations_are_folded_as_they_pile_up() -> None:
    tally = Tally()
    counter = tally.counter("t_calls", "Calls.")
    for _ in range(FOLD_AT * 3):
        tally.observe(counter, (), 1)
    assert len(tally._pending) < FOLD_AT
