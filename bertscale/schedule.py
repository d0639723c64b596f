"""Phase lookup and learning-rate schedule: pure functions of the global step and the phase table.

The global step only increases across phases; the current phase is looked up from it
(never computed by subtracting step counts in the training loop).
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class PhaseSpan:
    """Where a phase sits on the global step axis: steps [start, end)."""

    index: int
    start: int
    end: int

    @property
    def steps(self) -> int:
        return self.end - self.start


def phase_spans(steps_per_phase: Sequence[int]) -> list[PhaseSpan]:
    """Global-step spans of consecutive phases."""
    spans, start = [], 0
    for i, n in enumerate(steps_per_phase):
        if n < 1:
            raise ValueError(f"phase {i} has {n} steps; every phase needs at least one")
        spans.append(PhaseSpan(i, start, start + n))
        start += n
    return spans


def phase_at(global_step: int, spans: Sequence[PhaseSpan]) -> PhaseSpan:
    """The phase that trains global step ``global_step`` (0-based)."""
    if global_step < 0 or not spans or global_step >= spans[-1].end:
        total = spans[-1].end if spans else 0
        raise ValueError(f"global step {global_step} is outside the schedule of {total} steps")
    ends = [s.end for s in spans]
    return spans[bisect.bisect_right(ends, global_step)]


def lr_at(global_step: int, spans: Sequence[PhaseSpan], peak_lrs: Sequence[float],
          warmups: Sequence[float], powers: Sequence[float]) -> float:
    """Learning rate at ``global_step``: per phase, linear warmup to the peak, then polynomial decay to 0.

    Each phase re-warms. ``warmups`` are fractions of the phase's steps; warmup step j
    (1-based) runs at peak * j / warm, so no step runs at a rate of exactly 0.
    """
    span = phase_at(global_step, spans)
    i = span.index
    pos = global_step - span.start + 1
    warm = int(round(warmups[i] * span.steps))
    if warm > 0 and pos <= warm:
        return peak_lrs[i] * pos / warm
    remaining = span.steps - warm
    t = pos - warm - 1  # 0 .. remaining-1: the first decay step runs at the peak, none at exactly 0
    return peak_lrs[i] * (1.0 - t / remaining) ** powers[i]
