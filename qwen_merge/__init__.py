"""qwen_merge: merge PEFT LoRA adapters into Hugging Face safetensors checkpoints by streaming the shards.

    >>> from qwen_merge import merge_shards, plan_merge, iter_merged   # doctest: +SKIP
    >>> report = merge_shards("base_dir", "adapter_dir", "out_dir")   # doctest: +SKIP

The names below are imported on first use, so `import qwen_merge` (and `qwen-merge --help`) costs almost
nothing; torch is imported only when a tensor is computed.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .version import VERSION as __version__

_EXPORTS = {
    "push_merge": "push", "PushReport": "push",
    "merge_shards": "merge", "plan_merge": "merge", "iter_merged": "merge", "MergeReport": "merge",
    "verify_merge": "verify", "VerifyReport": "verify", "base_of": "inputs.basemodel",
    "MergeOptions": "options", "Rounding": "options",
    "MergePlan": "planning.plan", "TensorOp": "planning.plan",
    **dict.fromkeys(("QwenMergeError", "FormatError", "AdapterError", "MismatchError", "OutputError",
                     "DiskFullError", "OptionError", "NonFiniteError", "ZeroNormError", "AlreadyMergedError",
                     "HubError", "DownloadError", "UploadError"),
                    "errors"),
}
__all__ = [*_EXPORTS, "__version__"]

if TYPE_CHECKING:
    from .errors import (AdapterError, AlreadyMergedError, DiskFullError, DownloadError, FormatError, HubError,
                         MismatchError, NonFiniteError, OptionError, OutputError, QwenMergeError, UploadError,
                         ZeroNormError)
    from .inputs.basemodel import base_of
    from .merge import MergeReport, iter_merged, merge_shards, plan_merge
    from .options import MergeOptions, Rounding
    from .planning.plan import MergePlan, TensorOp
    from .push import PushReport, push_merge
    from .verify import VerifyReport, verify_merge


def __getattr__(name: str) -> object:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'qwen_merge' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value  # imported once
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
