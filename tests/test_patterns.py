"""rank_pattern / alpha_pattern resolution equals PEFT's own get_pattern_key on the tricky rows of
peft-semantics.md §2.2, and scales follow alpha/r or alpha/sqrt(r)."""

from __future__ import annotations

import math

import pytest

from qwen_merge.inputs.adapter import module_scale, pattern_key

ROWS = [
    (["q_proj"], "model.layers.0.self_attn.q_proj"),
    (["q_proj"], "model.q_proj"),
    (["layers.1.self_attn.q_proj"], "model.layers.1.self_attn.q_proj"),
    (["layers.1.self_attn.q_proj"], "model.layers.10.self_attn.q_proj"),
    (["1.self_attn.q_proj"], "model.layers.1.self_attn.q_proj"),
    (["1.self_attn.q_proj"], "model.layers.11.self_attn.q_proj"),
    (["proj"], "model.layers.0.self_attn.q_proj"),
    (["_proj"], "model.layers.0.self_attn.q_proj"),
    ([".*_proj"], "model.layers.0.mlp.up_proj"),
    (["layers.1.*"], "model.layers.10.self_attn.q_proj"),
    ([r"layers\.1\..*"], "model.layers.1.mlp.down_proj"),
    ([r"layers\.1\..*"], "model.layers.10.mlp.down_proj"),
    (["model.layers.1"], "model.layers.1.self_attn.q_proj"),
    (["^q_proj"], "model.q_proj"),
    (["^model.q_proj"], "model.q_proj"),
    (["q_proj", "layers.1.self_attn.q_proj"], "model.layers.1.self_attn.q_proj"),
    (["layers.1.self_attn.q_proj", "q_proj"], "model.layers.1.self_attn.q_proj"),
    (["experts.gate_up_proj"], "model.layers.0.mlp.experts.gate_up_proj"),
]


@pytest.mark.slow  # imports PEFT (and transformers)
@pytest.mark.parametrize("keys,name", ROWS)
def test_pattern_key_matches_peft(keys, name):
    from peft.utils.other import get_pattern_key  # imports transformers: not while collecting

    assert pattern_key(dict.fromkeys(keys, 1), name) == get_pattern_key(keys, name)


def test_rank_and_alpha_are_looked_up_independently_first_key_wins():
    config = {"r": 8, "lora_alpha": 16, "rank_pattern": {"q_proj": 4, "layers.1.self_attn.q_proj": 2},
              "alpha_pattern": {r"layers\.1\..*": 3}}
    assert module_scale(config, "model.layers.1.self_attn.q_proj") == (4, 3, 3 / 4)
    assert module_scale(config, "model.layers.10.self_attn.q_proj") == (4, 16, 4.0)
    assert module_scale(config, "model.layers.1.mlp.up_proj") == (8, 3, 3 / 8)


def test_rslora_scale_is_alpha_over_sqrt_r():
    rank, alpha, scale = module_scale({"r": 8, "lora_alpha": 13, "use_rslora": True}, "model.x.q_proj")
    assert scale == 13 / math.sqrt(8) and rank == 8 and alpha == 13
