"""Learning-rate and batch schedules: values at chosen steps against their documented formulas."""
from __future__ import annotations

import math

import pytest

from schedules import PHI, PHI_WARMUP_POWERS, accumulation_steps, learning_rate, parse_boundaries

PEAK, MIN, WARMUP, DECAY = 1e-3, 1e-4, 16, 116


@pytest.mark.parametrize("step, expected", [
    (0, PEAK * 1 / 17),
    (15, PEAK * 16 / 17),
    (16, PEAK),
    (66, MIN + 0.5 * (PEAK - MIN)),  # half way through the decay: cos(pi/2) = 0
    (116, MIN),
    (500, MIN),
])
def test_cosine_values(step: int, expected: float) -> None:
    assert learning_rate(step, "cosine", PEAK, MIN, WARMUP, DECAY) == pytest.approx(expected)


def test_phi_warmup_climbs_by_powers_of_phi_to_the_peak() -> None:
    assert PHI == pytest.approx(1.6180339887)
    lrs = [learning_rate(step, "phi", PEAK, MIN, WARMUP, DECAY) for step in range(WARMUP + 1)]
    # K = 8 stages of 16 / 8 = 2 steps: peak * phi^-(8 - floor(step * 8 / 16)).
    assert lrs[0] == lrs[1] == pytest.approx(PEAK * PHI ** -PHI_WARMUP_POWERS)
    assert lrs[2] == pytest.approx(PEAK * PHI ** -7)
    assert lrs[15] == pytest.approx(PEAK / PHI)
    assert lrs[16] == pytest.approx(PEAK)
    ratios = [b / a for a, b in zip(lrs, lrs[1:]) if not math.isclose(a, b)]
    assert ratios == pytest.approx([PHI] * PHI_WARMUP_POWERS)
    # After the warmup it decays exactly as the cosine schedule does.
    for step in (16, 40, 66, 115, 116, 200):
        assert learning_rate(step, "phi", PEAK, MIN, WARMUP, DECAY) == learning_rate(step, "cosine", PEAK, MIN, WARMUP, DECAY)


def test_phi_with_a_warmup_shorter_than_its_stages_still_reaches_the_peak() -> None:
    lrs = [learning_rate(step, "phi", PEAK, MIN, 3, 10) for step in range(4)]
    assert lrs == pytest.approx([PEAK * PHI ** -8, PEAK * PHI ** -6, PEAK * PHI ** -3, PEAK])


def test_unknown_schedule_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown lr schedule"):
        learning_rate(0, "linear", PEAK, MIN, WARMUP, DECAY)


@pytest.mark.parametrize("step, expected", [(0, 2), (99, 2), (100, 6), (299, 6), (300, 18), (600, 54), (10**6, 54)])
def test_trinity_triples_the_accumulation_at_each_boundary(step: int, expected: int) -> None:
    assert accumulation_steps(step, 2, "trinity", [100, 300, 600]) == expected


def test_constant_batch_ignores_boundaries() -> None:
    assert accumulation_steps(1000, 4, "constant", [1, 2, 3]) == 4


@pytest.mark.parametrize("text", ["100,50", "0,10", "a,b", "10,10"])
def test_bad_trinity_steps_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="--trinity_steps"):
        parse_boundaries(text)


def test_trinity_steps_parse() -> None:
    assert parse_boundaries("1000, 3000,6000") == [1000, 3000, 6000]
    assert parse_boundaries("") == []
