"""Tiny real models, tokenizers and PEFT adapters for the GGUF tests (test_gguf.py).

* :func:`build_tokenizer`: a byte-level BPE trained with `tokenizers` as Qwen's is made (ByteLevel
  pre-tokenizer, decoder and post-processor), the special tokens ``<|endoftext|>``, ``<|im_start|>``,
  ``<|im_end|>``, a non-special added token ``<think>`` and a chat template, saved by transformers.
* :data:`MODELS` / :func:`build_model`: Qwen2, Qwen3, Qwen2-MoE and Qwen3-MoE in bf16 (tied and untied, a
  Qwen3 with a head size other than hidden/heads and YaRN rope parameters, a Qwen2-MoE with a shared expert
  whose width is no multiple of 32; the untied Qwen2 and Qwen3 default-shaped for transformers' GGUF
  loader), random init, saved by transformers in several shards, with the tokenizer.
  Each config's vocab_size is larger than the tokenizer, so the converter writes ``[PAD<i>]`` rows.
* :func:`build_lora`: a real PEFT LoRA on attention and the dense MLP (the shared expert), and on a MoE
  model the router and the experts too (``target_parameters``, as tests/builders.build_fused_adapter does).
* :func:`build_resized_adapter` (tokens added, embedding and lm_head resized and in modules_to_save, the
  tokenizer saved beside the adapter) and :func:`build_own_tokenizer_adapter` (a LoRA whose tokenizer beside
  it has another chat template and an added special token, same vocabulary size).

No path here contains "reranker" (the converter would switch Qwen3 to reranker mode).
"""

from __future__ import annotations

import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from builders import CHAT_TEMPLATE, build_peft_adapter, build_tiny_base

VOCAB = 320  # config vocab_size: the tokenizer has fewer tokens, the rest are padding rows
BPE_VOCAB = 296  # trained tokens (specials included); + <think> = the tokenizer's length
SHARD = "60KB"  # several shards per model: the converter orders tensors shard by shard
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
ADDED = "<think>"  # an added token that is not special
SAMPLE = "<|im_start|>user\nhello world, the quick brown fox<|im_end|>\n<|im_start|>assistant\n<think>jumps</think>"
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
DENSE_MLP = ["gate_proj", "up_proj", "down_proj"]
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
OWN_TEMPLATE = CHAT_TEMPLATE.replace("{% for m in messages %}", "{% for m in messages %}{# tuned #}")
OWN_TOKEN = "<tool_call>"  # added (special) by the adapter's tokenizer, inside the padding rows
NEW_TOKENS = ("<tool>", "</tool>", "</think>")  # added by the resized-vocabulary adapter
RESIZED = 336


@dataclass(frozen=True)
class ModelSpec:
    model_type: str
    architecture: str  # the config's architectures[0]
    tied: bool
    config: dict = field(default_factory=dict)
    moe: bool = False


_COMMON = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               intermediate_size=96, max_position_embeddings=512)
_MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1,
            mlp_only_layers=[])
_YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128, "rope_theta": 1000000.0}

MODELS: dict[str, ModelSpec] = {
    "qwen2": ModelSpec("qwen2", "Qwen2ForCausalLM", tied=False),
    "qwen2_tied": ModelSpec("qwen2", "Qwen2ForCausalLM", tied=True),
    # head_dim 128 is Qwen3Config's default: transformers' GGUF loader ignores the file's head size
    "qwen3": ModelSpec("qwen3", "Qwen3ForCausalLM", tied=False, config=dict(head_dim=128)),
    "qwen3_tied_yarn": ModelSpec("qwen3", "Qwen3ForCausalLM", tied=True,
                                 config=dict(head_dim=32, rope_parameters=_YARN)),
    # shared expert 48 wide: its down projection's rows are no multiple of 32, so q8_0 falls back to f16
    "qwen2_moe": ModelSpec("qwen2_moe", "Qwen2MoeForCausalLM", tied=False, moe=True,
                           config=dict(_MOE, shared_expert_intermediate_size=48)),
    "qwen3_moe": ModelSpec("qwen3_moe", "Qwen3MoeForCausalLM", tied=False, moe=True, config=dict(_MOE, head_dim=16)),
    "qwen3_moe_tied": ModelSpec("qwen3_moe", "Qwen3MoeForCausalLM", tied=True, moe=True,
                                config=dict(_MOE, head_dim=16)),
}


def _corpus() -> list[str]:
    rng = random.Random(0)
    words = ["hello", "world", "the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "merge", "adapter",
             "model", "token", "shard", "qwen", "think", "answer", "user", "assistant", "1234", "3.14", "naïve"]
    return [" ".join(rng.choice(words) for _ in range(12)) + rng.choice([".", "!", "?", ",", "\n"])
            for _ in range(400)]


def build_tokenizer(folder: Path) -> Path:
    """A Qwen-style byte-level BPE tokenizer (see the module docstring), saved into `folder`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=BPE_VOCAB, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer)
    assert tok.get_vocab_size() == BPE_VOCAB, tok.get_vocab_size()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   chat_template=CHAT_TEMPLATE)
    assert fast.add_tokens([ADDED]) == 1
    assert len(fast) < VOCAB
    fast.save_pretrained(folder)
    return Path(folder)


def model_config(spec: ModelSpec):
    from transformers import AutoConfig

    return AutoConfig.for_model(spec.model_type, **_COMMON, tie_word_embeddings=spec.tied, **spec.config)


def build_model(spec: ModelSpec, folder: Path, tokenizer: Path, *, seed: int) -> Path:
    """`spec` in bf16, random init, saved by transformers in two or more shards, with `tokenizer`'s files."""
    build_tiny_base(model_config(spec), folder, seed=seed, max_shard_size=SHARD, min_shards=2)
    for path in Path(tokenizer).iterdir():
        shutil.copy2(path, folder / path.name)
    return folder


def lora_config(spec: ModelSpec) -> dict:
    """Attention and the dense MLP (Qwen2-MoE: its shared expert); on MoE models the router and experts too."""
    lora = dict(r=4, lora_alpha=8, target_modules=ATTENTION + DENSE_MLP)
    if spec.moe:
        lora.update(target_parameters=EXPERTS + ["mlp.gate.weight"])
    return lora


def build_lora(spec: ModelSpec, base: Path, out: Path, *, seed: int) -> Path:
    return build_peft_adapter(base, out, lora_config(spec), seed=seed)


def build_resized_adapter(base: Path, out: Path, *, seed: int) -> Path:
    """Tokens added to the base's tokenizer, the vocabulary resized to :data:`RESIZED` rows (more than the
    config's), embedding and lm_head trained in full (modules_to_save), tokenizer saved beside the adapter."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    assert tokenizer.add_tokens(list(NEW_TOKENS)) == len(NEW_TOKENS)
    assert len(tokenizer) <= RESIZED
    build_peft_adapter(base, out, dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                       modules_to_save=["embed_tokens", "lm_head"]),
                       seed=seed, resize=RESIZED, trained=True)
    tokenizer.save_pretrained(out)
    return out


def build_own_tokenizer_adapter(spec: ModelSpec, base: Path, out: Path, *, seed: int) -> Path:
    """A plain LoRA saved with a tokenizer of its own: another chat template and one more special token
    (inside the base's padding rows, so the vocabulary keeps its size)."""
    from transformers import AutoTokenizer

    build_lora(spec, base, out, seed=seed)
    tokenizer = AutoTokenizer.from_pretrained(base)
    assert tokenizer.add_special_tokens({"additional_special_tokens": [OWN_TOKEN]}) == 1
    tokenizer.chat_template = OWN_TEMPLATE
    tokenizer.save_pretrained(out)
    return out
