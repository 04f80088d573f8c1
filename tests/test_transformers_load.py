"""The merged folder loads with transformers and computes what the un-merged PeftModel computes.

Tolerance (bf16/fp16 weights, measured on these fixtures): merging rounds W + s·B@A to the stored
dtype once, while the un-merged PeftModel keeps the LoRA path in fp32, so logits differ by weight
rounding amplified through the network. We compare the difference with the adapter's own effect on
the logits (|unmerged - base|):
* mean |merged - unmerged| <= 3 % of mean |unmerged - base|   (observed <= 2.2 %, GPT-2 bf16)
* max  |merged - unmerged| <= 25 % of max |unmerged - base|   (observed <= 4 % for Qwen3, 14.5 % for GPT-2 bf16,
  whose two-layer model has a few sensitive positions; in fp32 compute it is still 9 %)
A dropped, mis-scaled or wrongly transposed delta changes the logits by tens of percent of the effect.
Against PEFT's own merge_and_unload() model, whose weights should match ours bit for bit except rare
1-ulp elements, the logits must agree to 1 % of the effect.
"""

from __future__ import annotations

import pytest
import torch
from builders import ADAPTERS, BASES, DTYPES, check_like_unmerged, load_base_model, logits, peft_unmerged, random_ids

VARIANTS = ["basic", "basic_tied", "rslora", "patterns", "layers02", "basic_fp16_base", "gpt2"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_merged_checkpoint_matches_unmerged_peft(zoo, variant):
    base, adapter = zoo.pair(variant)
    dtype = DTYPES[BASES[ADAPTERS[variant].base].dtype]
    out = zoo.merged(variant).out  # the session's merge (also checked against PEFT in test_against_peft)
    ids = random_ids(256)

    merged_model = load_base_model(out, dtype=dtype)
    assert merged_model.dtype == dtype
    ours = logits(merged_model, ids)
    base_logits = logits(load_base_model(base, dtype=dtype), ids)
    peft_model = peft_unmerged(base, adapter, dtype=dtype)
    unmerged = logits(peft_model, ids)
    peft_merged = logits(peft_model.merge_and_unload(), ids)

    effect, _ = check_like_unmerged(variant, ours, unmerged, base_logits, min_effect=0.05)
    assert (ours - peft_merged).abs().max() <= 0.01 * effect.max()


def test_tied_output_stays_tied(zoo):
    """LoRA on the projections only: the merged tied checkpoint still ties lm_head to embed_tokens."""
    from transformers import AutoModelForCausalLM

    base, _ = zoo.pair("basic_tied")
    model = AutoModelForCausalLM.from_pretrained(zoo.merged("basic_tied").out, dtype=torch.bfloat16)
    assert model.config.tie_word_embeddings is True
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    base_model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    assert torch.equal(model.model.embed_tokens.weight, base_model.model.embed_tokens.weight)
