"""The throughput benchmark's scaling ceiling (``benchmarks._ceiling``) on hand-built timings with known answers."""

from __future__ import annotations

import pytest

from benchmarks._ceiling import ceiling_line, lone_window_disturbed, scaling_ceiling


def test_ceiling_is_the_summed_rate_over_one_alone() -> None:
    assert scaling_ceiling(1.0, [1.0, 1.0]) == pytest.approx(2.0)  # no slowdown when both run: the full 2x
    assert scaling_ceiling(1.0, [1.25, 1.25]) == pytest.approx(1.6)  # each 25% slower together
    assert scaling_ceiling(0.5, [0.6, 0.75]) == pytest.approx(0.5 / 0.6 + 0.5 / 0.75)  # unequal processes
    assert scaling_ceiling(2.0, [2.0]) == pytest.approx(1.0)
    for bad in ((0.0, [1.0]), (1.0, []), (1.0, [1.0, 0.0])):
        with pytest.raises(ValueError, match="positive"):
            scaling_ceiling(*bad)


def test_the_line_names_the_figures() -> None:
    line = ceiling_line({"processes": 2, "s_per_pass_alone": 1.0, "s_per_pass_together": [1.2, 1.25], "ceiling": 1.63})
    assert "1.63x" in line and "1.00 s a pass alone" in line and "1.20, 1.25 s with 2 at once" in line


def test_an_impossible_ceiling_marks_the_lone_window_disturbed() -> None:
    # the development machine's disturbed run: 27.49 s a pass alone, 3.60 and 3.72 s two at once -> 15x
    assert lone_window_disturbed(scaling_ceiling(27.49, [3.60, 3.72]), 2)
    assert not lone_window_disturbed(scaling_ceiling(3.41, [3.45, 3.49]), 2)  # the same machine undisturbed: 1.96x
    assert not lone_window_disturbed(scaling_ceiling(1.0, [0.95, 0.95]), 2)  # a little above 2x (caches): plausible
    assert lone_window_disturbed(scaling_ceiling(1.0, [0.5]), 1)
    line = ceiling_line(
        {"processes": 2, "s_per_pass_alone": 1.0, "s_per_pass_together": [1.0, 1.0], "ceiling": 2.0,
         "alone_remeasured": True}
    )
    assert line.endswith("; the first lone window was disturbed and measured again")
