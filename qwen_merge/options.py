"""The options of a merge, as one value passed through plan, merge, iter and verify.

`MergeOptions` holds every choice that changes what a merge computes or accepts. The public functions
take the same names as keyword arguments and build one; `identity()` is the part that determines the
output bytes, recorded in the manifest and the resume state.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum

from .dtypes import output_dtype
from .errors import OptionError
from .units import parse_size

DEFAULT_BLOCK_BYTES = 8 << 20  # fp32 bytes of W per row block
TOKENIZER_CHOICES = ("auto", "base", "adapter")  # or a folder


class Rounding(str, Enum):
    """SINGLE: fp32 accumulation, one rounding to the stored dtype. PEFT: PEFT's double rounding where
    PEFT rounds ΔW to the weight's dtype before adding it (embedding LoRA, target_parameters, MiCA)."""

    SINGLE = "single"
    PEFT = "peft"


@dataclass(frozen=True, slots=True)
class MergeOptions:
    """rounding: see `Rounding`. key_map: (adapter prefix, base prefix) renames, tried before the known
    ones. allow_pickle: read a pickled adapter_model.bin with torch.load(weights_only=True).
    allow_nonfinite: write NaN/Inf instead of stopping. block_bytes: fp32 bytes of a row block, which
    bounds the working memory of each tensor. dtype: the output's float dtype ("bfloat16", "float16",
    "float32"; stored as the safetensors name, "BF16"...), None for the base's own. max_shard_size: bytes
    per output shard (or "5GB", "500MB"), None for the base's shard layout. low_disk: delete each base
    shard this run downloaded from the Hub as soon as the output shards that read it are complete (how the
    merge runs, not what it writes: not part of the identity). tokenizer: which tokenizer files the output
    gets: "auto" (the adapter's when they differ in substance from the base's), "base", "adapter", or a
    folder holding a tokenizer (`qwen_merge.tokenizer`)."""

    rounding: Rounding = Rounding.SINGLE
    key_map: tuple[tuple[str, str], ...] = ()
    allow_pickle: bool = False
    allow_nonfinite: bool = False
    block_bytes: int = DEFAULT_BLOCK_BYTES
    dtype: str | None = None
    max_shard_size: int | None = None
    low_disk: bool = False
    tokenizer: str = "auto"

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "rounding", Rounding(self.rounding))
        except ValueError as e:
            choices = ", ".join(repr(r.value) for r in Rounding)
            raise OptionError(f"must be one of {choices}, got {self.rounding!r}", option="rounding") from e
        if isinstance(self.key_map, Mapping):
            object.__setattr__(self, "key_map", tuple(self.key_map.items()))
        if any(not (isinstance(a, str) and isinstance(b, str) and a) for a, b in self.key_map):
            raise OptionError(f"must map non-empty prefixes to prefixes, got {self.key_map!r}", option="key_map")
        if type(self.block_bytes) is not int or self.block_bytes <= 0:
            raise OptionError(f"must be a positive integer, got {self.block_bytes!r}", option="block_bytes")
        if self.dtype is not None:
            try:
                object.__setattr__(self, "dtype", output_dtype(self.dtype))
            except ValueError as e:
                raise OptionError(str(e), option="dtype") from e
        if isinstance(self.tokenizer, os.PathLike):
            object.__setattr__(self, "tokenizer", os.fspath(self.tokenizer))
        if not isinstance(self.tokenizer, str) or not self.tokenizer:
            raise OptionError(f"must be one of {', '.join(TOKENIZER_CHOICES)} or a folder, got {self.tokenizer!r}",
                              option="tokenizer")
        if self.max_shard_size is not None:
            try:
                object.__setattr__(self, "max_shard_size", parse_size(self.max_shard_size))
            except ValueError as e:
                raise OptionError(str(e), option="max_shard_size") from e

    @classmethod
    def of(cls, options: MergeOptions | None = None, **overrides: object) -> MergeOptions:
        """`options` (or the defaults) with the keyword arguments a caller passed set on top; `None`
        values mean "not given"."""
        given = {k: v for k, v in overrides.items() if v is not None}
        return dataclasses.replace(options or cls(), **given)

    def identity(self) -> dict:
        """The options that determine the output bytes, as recorded in the manifest."""
        return {"rounding": self.rounding.value, "key_map": dict(self.key_map),
                "allow_nonfinite": self.allow_nonfinite, "block_bytes": self.block_bytes,
                "dtype": self.dtype, "max_shard_size": self.max_shard_size,
                "tokenizer": self.tokenizer if self.tokenizer in TOKENIZER_CHOICES else "folder"}

    @classmethod
    def from_identity(cls, recorded: Mapping) -> MergeOptions:
        """The options an `identity()` records (a manifest's `options`); the fields it lacks keep their
        defaults, and keys this version does not know are left out.

        Raises:
            OptionError: a recorded value is not valid.
        """
        known = ("rounding", "key_map", "allow_nonfinite", "block_bytes", "dtype", "max_shard_size", "tokenizer")
        # a tokenizer folder is recorded as "folder", not by its path: it cannot be recovered from the record
        return cls(**{key: recorded[key] for key in known if key in recorded and recorded[key] != "folder"})

    def given(self) -> set[str]:
        """The fields that differ from the defaults: those a caller set in this value."""
        default = MergeOptions()
        return {f.name for f in dataclasses.fields(self) if getattr(self, f.name) != getattr(default, f.name)}

