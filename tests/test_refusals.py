"""Adapters qwen_merge must refuse: the right error class, a one-line message naming the offending
key or field, and nothing written (no destination, no temp folder beside it, inputs unchanged).

Each bad adapter starts as a real PEFT adapter (fixtures_models "basic", or the real DoRA one) and is
edited: adapter_config.json fields changed, tensors added, renamed or replaced with safetensors.torch.
"""

from __future__ import annotations

import json
import pathlib
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fixtures_models import PREFIX, tree_hash
from qwen_merge import AdapterError, MismatchError, QwenMergeError, merge_shards, plan_merge

L0Q = PREFIX + "model.layers.0.self_attn.q_proj"


def _randn(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(99))


class Edit:
    """Declarative edit of a copied adapter folder."""

    def __init__(self, config=None, add=None, replace=None, rename=None, source="basic", drop=(), write_bin=False):
        self.config = config or {}
        self.add = add or {}
        self.replace = replace or {}
        self.rename = rename or {}
        self.source = source
        self.drop = drop
        self.write_bin = write_bin

    def apply(self, zoo, dst: Path) -> Path:
        shutil.copytree(zoo.adapter(self.source), dst)
        cfg_path = dst / "adapter_config.json"
        if self.config:
            cfg = json.loads(cfg_path.read_text())
            cfg.update(self.config)
            cfg_path.write_text(json.dumps(cfg, indent=2))
        st = dst / "adapter_model.safetensors"
        if self.add or self.replace or self.rename:
            tensors = load_file(st)
            for old, new in self.rename.items():
                for key in [k for k in tensors if k.startswith(old + ".")]:
                    tensors[new + key[len(old) :]] = tensors.pop(key)
            for key, value in self.replace.items():
                assert key in tensors, key
                tensors[key] = value
            for key, value in self.add.items():
                assert key not in tensors, key
                tensors[key] = value
            save_file(tensors, st, metadata={"format": "pt"})
        if self.write_bin:
            state = {k: v for k, v in load_file(st).items()}
            state["__sentinel__"] = _Touch(dst.parent / "PICKLE_WAS_LOADED")
            (dst / "adapter_model.bin").write_bytes(pickle.dumps(state))
        for name in self.drop:
            (dst / name).unlink()
        return dst


class _Touch:
    """Unpickling this creates a sentinel file: proof that a pickle was loaded."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def __reduce__(self):
        return (pathlib.Path.touch, (self.path,))


# (id, edit, error class, needles): the message must contain every substring of at least one needle tuple.
CASES = [
    ("peft_type_loha", Edit(config={"peft_type": "LOHA"}), AdapterError, [("peft_type",), ("LOHA",)]),
    ("peft_type_ia3", Edit(config={"peft_type": "IA3"}), AdapterError, [("peft_type",), ("IA3",)]),
    (
        "bin_only",
        Edit(write_bin=True, drop=("adapter_model.safetensors",)),
        AdapterError,
        [("adapter_model.bin",), ("adapter_model.safetensors",)],
    ),
    ("missing_config", Edit(drop=("adapter_config.json",)), AdapterError, [("adapter_config.json",)]),
    (
        "unknown_module",
        Edit(rename={L0Q: PREFIX + "model.layers.0.self_attn.qq_proj"}),
        MismatchError,
        [("model.layers.0.self_attn.qq_proj", "model.layers.0.self_attn.q_proj")],
    ),
    (
        "unknown_layer",
        Edit(rename={PREFIX + "model.layers.3.mlp.up_proj": PREFIX + "model.layers.9.mlp.up_proj"}),
        MismatchError,
        [("model.layers.9.mlp.up_proj",)],
    ),
    (
        "shape_in_features",
        Edit(replace={L0Q + ".lora_A.weight": _randn(8, 32)}),
        MismatchError,
        [("model.layers.0.self_attn.q_proj",)],
    ),
    (
        "shape_out_features",
        Edit(replace={PREFIX + "model.layers.1.self_attn.k_proj.lora_B.weight": _randn(64, 8)}),
        MismatchError,
        [("model.layers.1.self_attn.k_proj",)],
    ),
    (
        "rank_a_b_disagree",
        Edit(replace={PREFIX + "model.layers.2.mlp.down_proj.lora_B.weight": _randn(64, 4)}),
        MismatchError,
        [("model.layers.2.mlp.down_proj",)],
    ),
    (
        "rank_vs_rank_pattern",
        Edit(config={"rank_pattern": {"^model.layers.3.mlp.up_proj": 4}}),
        MismatchError,
        [("model.layers.3.mlp.up_proj",)],
    ),
    ("rank_vs_config_r", Edit(config={"r": 16}), MismatchError, [("_proj",)]),
]


def _check_message(exc: BaseException, needles) -> None:
    msg = str(exc)
    assert msg.strip(), "empty error message"
    assert "\n" not in msg.strip(), f"message is not a single line: {msg!r}"
    assert any(all(n in msg for n in needle) for needle in needles), f"message does not name {needles}: {msg!r}"


@pytest.mark.parametrize("edit,exc_type,needles", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_refused(zoo, tmp_path, edit, exc_type, needles):
    base = zoo.base("qwen_bf16")
    adapter = edit.apply(zoo, tmp_path / "adapter")
    parent = tmp_path / "dest_parent"
    parent.mkdir()
    dest = parent / "out"
    before = (tree_hash(base), tree_hash(adapter))

    with pytest.raises(QwenMergeError) as info:
        merge_shards(base, adapter, dest, progress=False)
    assert type(info.value) is exc_type, f"{type(info.value).__name__}: {info.value}"
    _check_message(info.value, needles)

    assert not dest.exists() and not dest.is_symlink(), "destination was created"
    assert list(parent.iterdir()) == [], f"leftovers beside the destination: {list(parent.iterdir())}"
    assert (tree_hash(base), tree_hash(adapter)) == before, "an input was modified"
    assert not (tmp_path / "PICKLE_WAS_LOADED").exists(), "a pickle was loaded"

    with pytest.raises(QwenMergeError) as info_plan:
        plan_merge(base, adapter)
    assert type(info_plan.value) is exc_type, f"plan_merge: {type(info_plan.value).__name__}: {info_plan.value}"
    _check_message(info_plan.value, needles)
    assert not (tmp_path / "PICKLE_WAS_LOADED").exists(), "a pickle was loaded"


def test_pickle_sentinel_works(tmp_path):
    """Guard for the bin_only case: unpickling our .bin really would leave a trace."""
    data = pickle.dumps({"x": _Touch(tmp_path / "touched")})
    pickle.loads(data)
    assert (tmp_path / "touched").exists()


def test_edited_adapters_are_otherwise_loadable(zoo, tmp_path):
    """Guard: the starting adapter merges fine, so every refusal above is caused by its edit."""
    base = zoo.base("qwen_bf16")
    adapter = Edit().apply(zoo, tmp_path / "adapter")
    report = merge_shards(base, adapter, tmp_path / "out", progress=False)
    assert report.merged == 4 * 7
