"""Loading ``.pt`` files without running code from them.

A ``.pt`` file is a pickle, and unpickling may call any function the file names: a checkpoint that
someone shared, or that was tampered with, could run code the moment it is loaded. Every ``.pt`` that
bertscale reads, or makes DeepSpeed read, is loaded with ``torch.load(weights_only=True)``, whose
unpickler builds only tensors, containers and plain values, plus the few types of ``allowed_globals``:
the ones DeepSpeed's ZeRO 1/2/3 checkpoint files hold (found by loading real bf16 and fp16
checkpoints with ``weights_only=True`` and reading the refusals), all plain data.

- ``load(path)``: one file; a refused file raises ``UnsafeFileError`` naming the file and the global.
- ``check_directory(path)``: every ``.pt`` of a checkpoint directory, inspected without unpickling
  anything, before DeepSpeed reads them (so the refusal names the file).
- ``enforced()`` / ``enforce_in_this_process()``: every ``torch.load`` (DeepSpeed's checkpoint engine
  and ``zero_to_fp32`` ask for ``weights_only=False``) runs weights-only with the allow-list,
  through torch's own ``TORCH_FORCE_WEIGHTS_ONLY_LOAD`` switch.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
import zipfile
from collections.abc import Iterator
from pathlib import Path

import torch

_FORCE = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"


class UnsafeFileError(ValueError):
    """A file asks the unpickler for something that is not plain data; the message names both."""


def allowed_globals() -> list:
    """Types a bertscale or DeepSpeed checkpoint may contain besides tensors and containers."""
    import numpy as np
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    reconstruct = np.ndarray.__reduce__(np.zeros(1))[0]  # numpy's array rebuilder, whatever its module
    return [
        ZeroStageEnum,        # optimizer states: the ZeRO stage
        fragment_address,     # ZeRO 1/2 optimizer states: where each parameter sits in the flat partition
        LossScaler,           # bf16 optimizer states: a static scaler of 1
        DynamicLossScaler,    # fp16 optimizer states: the dynamic loss scale
        # our per-rank state: numpy's RNG state is an array (rebuilt from its bytes, never from code)
        (reconstruct, "numpy._core.multiarray._reconstruct"),
        (reconstruct, "numpy.core.multiarray._reconstruct"),  # the name numpy < 2 wrote
        np.ndarray, np.dtype, type(np.dtype(np.uint32)),
    ]


def _allowing() -> torch.serialization.safe_globals:
    """torch's ``safe_globals`` context for the allow-list entries not allowed already: leaving it
    removes what it added, and must not remove what ``enforce_in_this_process`` allowed for good."""
    have = set(torch.serialization.get_safe_globals())
    return torch.serialization.safe_globals([g for g in allowed_globals() if g not in have])


def _refusal(path: Path, names: list[str] | str) -> UnsafeFileError:
    names = [names] if isinstance(names, str) else names
    return UnsafeFileError(
        f"{path}: refused to load: it asks the unpickler for {', '.join(names)}, which is not a type a "
        f"bertscale or DeepSpeed checkpoint contains; loading it could run code. Was this file made by "
        f"another program, or altered? Use a checkpoint written by bertscale")


def _unpickler_complaint(exc: Exception) -> str:
    found = re.search(r"GLOBAL (\S+)", str(exc)) or re.search(r"[Uu]nsupported (?:global|operand)[^:]*: (\S+)", str(exc))
    return found.group(1) if found else str(exc).strip().splitlines()[0]


def load(path: str | os.PathLike, map_location: str | torch.device = "cpu"):
    """``torch.load`` of one file, weights-only with the allow-list."""
    path = Path(path)
    with _allowing():
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as exc:
            raise _refusal(path, _unpickler_complaint(exc)) from None


def check_directory(path: str | os.PathLike) -> None:
    """Refuse a checkpoint directory if any of its ``.pt`` files needs more than the allow-list.

    Zip-format files (what torch and DeepSpeed write) are inspected without unpickling anything;
    any other ``.pt`` is loaded weights-only, which is safe too.
    """
    with _allowing():
        for file in sorted(Path(path).glob("*.pt")):
            if zipfile.is_zipfile(file):
                try:
                    unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(file)
                except Exception as exc:  # noqa: BLE001 - a damaged file: say which
                    raise ValueError(f"{file}: not a readable torch file ({exc}); the checkpoint is damaged") from None
                if unsafe:
                    raise _refusal(file, unsafe)
            else:
                load(file)


@contextlib.contextmanager
def enforced() -> Iterator[None]:
    """Within the block, every ``torch.load`` in this process is weights-only with the allow-list."""
    before = os.environ.get(_FORCE)
    os.environ[_FORCE] = "1"
    try:
        with _allowing():
            yield
    except pickle.UnpicklingError as exc:
        raise UnsafeFileError(f"refused to load a checkpoint file that asks the unpickler for "
                              f"{_unpickler_complaint(exc)}; loading it could run code") from None
    finally:
        if before is None:
            os.environ.pop(_FORCE, None)
        else:
            os.environ[_FORCE] = before


def enforce_in_this_process() -> None:
    """For a training rank (a process of ours): ``enforced()`` for the rest of its life."""
    os.environ[_FORCE] = "1"
    torch.serialization.add_safe_globals(allowed_globals())
