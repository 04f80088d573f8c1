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

from fixtures_models import ADAPTERS, BASES, DTYPES
from qwen_merge import merge_shards

VARIANTS = ["basic", "basic_tied", "rslora", "patterns", "layers02", "basic_fp16_base", "gpt2"]


def _input_ids() -> torch.Tensor:
    return torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1234))


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits.float()


@pytest.mark.parametrize("variant", VARIANTS)
def test_merged_checkpoint_matches_unmerged_peft(zoo, tmp_path, variant):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base, adapter = zoo.pair(variant)
    base_spec = BASES[ADAPTERS[variant].base]
    dtype = DTYPES[base_spec.dtype]
    out = tmp_path / "merged"
    merge_shards(base, adapter, out, progress=False)
    ids = _input_ids()

    merged_model = AutoModelForCausalLM.from_pretrained(out, dtype=dtype)
    assert merged_model.dtype == dtype
    ours = _logits(merged_model, ids)
    base_logits = _logits(AutoModelForCausalLM.from_pretrained(base, dtype=dtype), ids)
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=dtype), adapter)
    unmerged = _logits(peft_model, ids)
    peft_merged = _logits(peft_model.merge_and_unload(), ids)

    effect = (unmerged - base_logits).abs()
    diff = (ours - unmerged).abs()
    print(
        f"\n[{variant}] |merged-unmerged| mean {diff.mean():.5f} max {diff.max():.5f}; "
        f"adapter effect mean {effect.mean():.4f} max {effect.max():.4f}"
    )
    assert effect.mean() > 0.05, "fixture error: the adapter barely changes the logits"
    assert diff.mean() <= 0.03 * effect.mean()
    assert diff.max() <= 0.25 * effect.max()
    assert (ours - peft_merged).abs().max() <= 0.01 * effect.max()


def test_tied_output_stays_tied(zoo, tmp_path):
    """LoRA on the projections only: the merged tied checkpoint still ties lm_head to embed_tokens."""
    from transformers import AutoModelForCausalLM

    base, adapter = zoo.pair("basic_tied")
    out = tmp_path / "merged"
    merge_shards(base, adapter, out, progress=False)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    assert model.config.tie_word_embeddings is True
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    base_model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    assert torch.equal(model.model.embed_tokens.weight, base_model.model.embed_tokens.weight)
