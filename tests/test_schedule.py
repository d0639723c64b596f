"""Phase lookup and the learning-rate schedule, checked against a formula written out by hand."""

from __future__ import annotations

import pytest

from bertscale.schedule import PhaseSpan, lr_at, phase_at, phase_spans


def reference_lr(step: int, steps: list[int], peaks: list[float], warmups: list[float],
                 powers: list[float]) -> float:
    """Per phase: warmup step j of W (1-based) at peak*j/W; then decay step k of D (0-based) at
    peak*(1 - k/D)**power."""
    start = 0
    for n, peak, frac, power in zip(steps, peaks, warmups, powers):
        if step < start + n:
            local = step - start
            w = int(round(frac * n))
            if local < w:
                return peak * (local + 1) / w
            return peak * (1 - (local - w) / (n - w)) ** power
        start += n
    raise AssertionError("step outside the schedule")


def test_phase_spans():
    spans = phase_spans([10, 4, 1])
    assert spans == [PhaseSpan(0, 0, 10), PhaseSpan(1, 10, 14), PhaseSpan(2, 14, 15)]
    assert [s.steps for s in spans] == [10, 4, 1]
    assert phase_spans([]) == []


@pytest.mark.parametrize("steps", [[10, 0], [-1]])
def test_phase_spans_rejects_empty_phases(steps):
    with pytest.raises(ValueError, match="every phase needs at least one"):
        phase_spans(steps)


def test_phase_at_boundaries():
    spans = phase_spans([10, 4])
    assert phase_at(0, spans).index == 0
    assert phase_at(9, spans).index == 0  # end - 1 of phase 0
    assert phase_at(10, spans).index == 1  # end of phase 0 = start of phase 1
    assert phase_at(13, spans) == PhaseSpan(1, 10, 14)
    for bad in (-1, 14, 100):
        with pytest.raises(ValueError, match=f"global step {bad} is outside the schedule of 14 steps"):
            phase_at(bad, spans)
    with pytest.raises(ValueError, match="outside the schedule of 0 steps"):
        phase_at(0, [])


def test_phase_at_every_step():
    steps = [3, 1, 5]
    spans = phase_spans(steps)
    expected = [i for i, n in enumerate(steps) for _ in range(n)]
    assert [phase_at(s, spans).index for s in range(sum(steps))] == expected


def test_lr_exact_values_linear_and_sqrt_decay():
    steps, peaks, warmups, powers = [10, 4], [1e-3, 5e-4], [0.2, 0.5], [1.0, 0.5]
    spans = phase_spans(steps)
    lrs = [lr_at(s, spans, peaks, warmups, powers) for s in range(14)]
    # phase 0: 2 warmup steps, then 8 linear decay steps
    assert lrs[0] == pytest.approx(0.5e-3)
    assert lrs[1] == pytest.approx(1e-3)  # the end of warmup reaches the peak
    assert lrs[2] == pytest.approx(1e-3)  # the first decay step runs at the peak
    assert lrs[5] == pytest.approx(1e-3 * (1 - 3 / 8))
    assert lrs[9] == pytest.approx(1e-3 / 8)
    # phase 1 re-warms: 2 warmup steps, then 2 decay steps with power 0.5
    assert lrs[10] == pytest.approx(2.5e-4)
    assert lrs[11] == pytest.approx(5e-4)
    assert lrs[12] == pytest.approx(5e-4)
    assert lrs[13] == pytest.approx(5e-4 * 0.5 ** 0.5)
    for s in range(14):
        assert lrs[s] == pytest.approx(reference_lr(s, steps, peaks, warmups, powers), rel=1e-12)


@pytest.mark.parametrize("steps, warmups, powers", [
    ([100, 30], [0.1, 0.3], [1.0, 0.5]),
    ([7038, 1563], [0.2843, 0.128], [0.5, 0.5]),  # the bert_base recipe
    ([5, 5], [0.0, 1.0], [1.0, 2.0]),  # no warmup; warmup over the whole phase
    ([1, 1], [0.5, 0.0], [1.0, 1.0]),
])
def test_lr_matches_reference_everywhere(steps, warmups, powers):
    spans = phase_spans(steps)
    peaks = [6e-3, 4e-3]
    for s in range(sum(steps)):
        got = lr_at(s, spans, peaks, warmups, powers)
        peak = peaks[phase_at(s, spans).index]
        assert got == pytest.approx(reference_lr(s, steps, peaks, warmups, powers), rel=1e-12)
        assert 0 < got <= peak * (1 + 1e-12), f"step {s}: lr {got} outside (0, {peak}]"


def test_warmup_is_linear_and_increasing():
    spans = phase_spans([50])
    lrs = [lr_at(s, spans, [1.0], [0.2], [1.0]) for s in range(10)]
    assert lrs == pytest.approx([(j + 1) / 10 for j in range(10)])
    assert all(b > a for a, b in zip(lrs, lrs[1:]))


def test_decay_is_monotonic_and_never_zero():
    spans = phase_spans([40])
    lrs = [lr_at(s, spans, [2e-3], [0.25], [0.5]) for s in range(10, 40)]
    assert all(b < a for a, b in zip(lrs, lrs[1:]))
    assert lrs[-1] == pytest.approx(2e-3 * (1 / 30) ** 0.5)


def test_second_phase_rewarms_from_near_zero():
    spans = phase_spans([100, 100])
    lrs = [lr_at(s, spans, [1e-3, 1e-3], [0.1, 0.1], [1.0, 1.0]) for s in range(200)]
    assert lrs[99] == pytest.approx(1e-3 / 90)  # the end of phase 0 is far below the peak
    assert lrs[100] == pytest.approx(1e-3 / 10)  # phase 1 starts its own warmup ...
    assert lrs[109] == pytest.approx(1e-3)  # ... and reaches its own peak after 10 steps
    assert max(lrs[100:]) == pytest.approx(1e-3)
    assert min(lrs) > 0


def test_lr_outside_schedule_raises():
    spans = phase_spans([3])
    with pytest.raises(ValueError, match="outside the schedule"):
        lr_at(3, spans, [1.0], [0.0], [1.0])
