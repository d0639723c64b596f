"""Run state: the few numbers that say where training is, in one object that checkpoints itself."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields


@dataclass
class RunState:
    """Position of the run; saved in every checkpoint and restored on resume."""

    global_step: int = 0
    """Optimizer steps completed since the start of the run (all phases)."""
    phase_index: int = 0
    """Index of the phase being trained (looked up from global_step, stored for checks)."""
    samples_seen: int = 0
    """Sequences consumed by optimizer steps, over all ranks."""
    tokens_seen: int = 0
    """Non-padding tokens consumed, over all ranks."""
    phase_complete: bool = False
    """True in the checkpoint written at the last step of a phase."""
    world_size_changes: list[dict] = field(default_factory=list)
    """Mid-phase resumes on another number of ranks: ``{"global_step", "from", "to"}`` each."""
    precision_changes: list[dict] = field(default_factory=list)
    """Mid-phase resumes in another precision (bf16, fp16, fp32): ``{"global_step", "from", "to"}`` each."""

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        known = {f.name for f in fields(self)}
        unknown = set(state) - known
        if unknown:
            raise ValueError(f"run state has unknown fields {sorted(unknown)}; was it written by a newer bertscale?")
        for key, value in state.items():
            setattr(self, key, value)
