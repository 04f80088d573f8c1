"""Untouched tensors never pass through torch: their bytes go from the base shard to the output as they are.

* A merge whose adapter computes nothing (a saved module replaces a tensor in its own dtype) runs without
  ever importing torch, and its output holds the replacement and the base's bytes.
* In a merge that computes, exactly the tensors the plan computes reach the compute code; every other
  tensor is copied byte for byte.
"""

from __future__ import annotations

import json

import torch
from builders import (ADAPTER_CFG, ADAPTER_ST, PREFIX, checkpoint_tensors, locate, run_python, to_tensor,
                      write_safetensors)

import qwen_merge.run as run_module
from qwen_merge import merge_shards, plan_merge

NORM = "model.norm.weight"


def test_a_merge_that_computes_nothing_never_imports_torch(zoo, tmp_path):
    base = zoo.base("qwen_bf16")
    _, _, info = locate(base, NORM)
    replacement = torch.linspace(0.5, 1.5, info["shape"][0]).to(torch.bfloat16)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    write_safetensors(adapter / ADAPTER_ST, {PREFIX + NORM: replacement}, {"format": "pt"})
    (adapter / ADAPTER_CFG).write_text(json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 16,
                                                   "target_modules": ["q_proj"], "modules_to_save": ["norm"]}))
    out = tmp_path / "out"
    code = ("import sys; from qwen_merge import merge_shards; "
            f"merge_shards({str(base)!r}, {str(adapter)!r}, {str(out)!r}, progress=False); "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    run_python(code, check=True)
    ours, theirs = checkpoint_tensors(out), checkpoint_tensors(base)
    assert to_tensor(*ours[NORM][1:]).equal(replacement)
    assert all(ours[n] == theirs[n] for n in theirs if n != NORM)


def test_only_the_planned_tensors_reach_the_compute_code(zoo, tmp_path, monkeypatch):
    base, adapter = zoo.base("qwen_bf16"), zoo.adapter("basic")
    computed: list[str] = []
    real_call, real_batch = run_module.LazyComputer.__call__, run_module.LazyComputer.batch

    def call(self, op, only=None):
        computed.append(op.name)
        return real_call(self, op, only)

    def batch(self, ops):
        computed.extend(op.name for op in ops)
        return real_batch(self, ops)

    monkeypatch.setattr(run_module.LazyComputer, "__call__", call)
    monkeypatch.setattr(run_module.LazyComputer, "batch", batch)
    plan = plan_merge(base, adapter)
    merge_shards(base, adapter, tmp_path / "out", progress=False)
    assert sorted(computed) == sorted(op.name for op in plan.ops if not op.is_raw_copy)
    ours, theirs = checkpoint_tensors(tmp_path / "out"), checkpoint_tensors(base)
    untouched = [n for n in theirs if n not in computed]
    assert untouched and all(ours[n] == theirs[n] for n in untouched)
