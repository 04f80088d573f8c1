"""qwen_merge: merge PEFT LoRA adapters into Hugging Face safetensors checkpoints by streaming the shards.

    >>> from qwen_merge import merge_shards, plan_merge, iter_merged   # doctest: +SKIP
    >>> report = merge_shards("base_dir", "adapter_dir", "out_dir")   # doctest: +SKIP
"""

from .errors import AdapterError, DiskFullError, FormatError, MismatchError, OutputError, QwenMergeError
from .manifest import VERSION as __version__
from .merge import MergeReport, iter_merged, merge_shards, plan_merge
from .plan import MergePlan, PlannedMerge
from .verify import VerifyReport, verify_merge

__all__ = [
    "merge_shards", "plan_merge", "iter_merged", "MergePlan", "PlannedMerge", "MergeReport",
    "QwenMergeError", "FormatError", "AdapterError", "MismatchError", "OutputError", "DiskFullError",
    "__version__", "verify_merge", "VerifyReport",
]
