"""The throughput benchmark's scaling ceiling (``benchmarks._ceiling``) on hand-built timings with known answers."""

from __future__ import annotations

import pytest

from benchmarks._ceiling import ceiling_line, scaling_ceiling


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
