"""``compare_times``: interleaved rounds, and isolated calls whose pauses stay out of the times."""

import time

from kscan.pipelines.timing import compare_times


def test_rounds_interleave():
    calls: list[str] = []
    compare_times({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, 3, warmup=1)
    assert calls == ["a", "b"] + ["a", "b"] * 3  # warm-up, then one call of each per round


def test_isolated_calls_pause_and_rewarm_untimed():
    calls: list[str] = []
    start = time.perf_counter()
    times = compare_times(
        {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
        repeats=3,
        warmup=1,
        isolate_s=0.02,
    )
    elapsed = time.perf_counter() - start
    # warm-up, then per round and candidate an untimed call right before the timed one
    assert calls == ["a", "b"] + ["a", "a", "b", "b"] * 3
    assert elapsed >= 0.02 * 6  # a pause before each of the 6 timed calls
    for t in times.values():
        assert t["repeats"] == 3
        assert t["min_s"] <= t["median_s"] <= t["max_s"]
        assert t["median_s"] < 0.02  # the pauses are not in the times
