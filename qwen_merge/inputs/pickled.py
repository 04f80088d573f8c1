"""Opt-in reading of a pickled adapter (`adapter_model.bin`): with `torch.load(weights_only=True)`, which
refuses anything but tensors and plain containers, converted to a temporary safetensors file so the rest
of the merge reads it like any other adapter."""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..errors import AdapterError
from ..files import ADAPTER_WEIGHTS
from .adapter import pickle_path


def unpickle_adapter(adapter: Path, scratch: Path) -> Path | None:
    """Convert the adapter's pickle into `scratch`; None when the adapter has a safetensors file."""
    source = pickle_path(adapter) if adapter.is_dir() else None
    if source is None:
        return None
    try:
        state = torch.load(source, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise AdapterError(f"{source}: refused by torch.load(weights_only=True): {first}") from e
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise AdapterError(f"{source}: expected a dict of tensor name -> tensor, found {type(state).__name__}")
    target = scratch / ADAPTER_WEIGHTS
    save_file({k: v.contiguous() for k, v in state.items()}, target, metadata={"format": "pt"})
    return target
