"""``compare_times``: interleaved rounds, and pauses that stay out of the timed calls."""

import time

from kscan.pipelines.timing import compare_times


def test_rounds_interleave_and_pauses_are_not_timed():
    calls: list[str] = []
    start = time.perf_counter()
    times = compare_times(
        {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
        repeats=3,
        warmup=1,
        pause_s=0.02,
    )
    elapsed = time.perf_counter() - start
    assert calls == ["a", "b"] + ["a", "b"] * 3  # warm-up, then one call of each per round
    assert elapsed >= 0.02 * 7  # after the warm-up and after each of the 6 timed calls
    for t in times.values():
        assert t["repeats"] == 3
        assert t["min_s"] <= t["median_s"] <= t["max_s"]
        assert t["median_s"] < 0.02  # the pauses are not in the times
