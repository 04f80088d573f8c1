"""qwen_merge: merge PEFT LoRA adapters into Hugging Face safetensors checkpoints by streaming the shards.

    >>> from qwen_merge import merge_shards, plan_merge, iter_merged   # doctest: +SKIP
    >>> report = merge_shards("base_dir", "adapter_dir", "out_dir")   # doctest: +SKIP
"""

from .errors import AdapterError, FormatError, MismatchError, OutputError, QwenMergeError
from .merge import MergeReport, iter_merged, merge_shards, plan_merge
from .plan import MergePlan, PlannedMerge

__version__ = "0.1.0"
__all__ = [
    "merge_shards", "plan_merge", "iter_merged", "MergePlan", "PlannedMerge", "MergeReport",
    "QwenMergeError", "FormatError", "AdapterError", "MismatchError", "OutputError", "__version__",
]
