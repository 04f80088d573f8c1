"""A GGUF file's metadata (planning.ggufmeta): every field equals what llama.cpp's converter writes for the same
model folder, with the same GGUF value type and in the converter's order, provenance fields aside.

The reference is the converter itself (`convert_hf_to_gguf.py` from the llama-cpp-python sdist, with its own
gguf-py) run on tiny real Qwen2 / Qwen3 / Qwen2-MoE / Qwen3-MoE folders that transformers saved, with a real
byte-level BPE tokenizer made by `tokenizers` (special and non-special added tokens, a chat template, a
config vocab_size larger than the tokenizer's) and sampling settings in generation_config.json. Our fields
are written with gguf's GGUFWriter and read back, so the on-disk types are compared too. The rules the
converter applies (padding ids, token types, add-bos/eos, rope scaling, resized vocabularies, refusals)
also have tests of their own that need neither the converter nor transformers.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import llamacpp
import pytest
from builders import run_python

from qwen_merge.errors import FormatError
from qwen_merge.planning.ggufmeta import GGUF_ARCHITECTURES, MetaField, gguf_metadata

gguf = pytest.importorskip("gguf")

CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TOKENIZER_SIZE = 300  # trained vocabulary (the first special token included)
# the three added after training: 300 <|im_start|>, 301 <|im_end|>, 302 <think>
PROVENANCE = ("general.name", "general.basename", "general.finetune", "general.version", "general.size_label",
              "general.license", "general.tags", "general.base_model", "general.datasets", "general.languages",
              "general.repo_url", "general.author", "general.organization", "general.description", "general.url",
              "general.doi", "general.uuid", "general.source", "general.quantized_by")


def write_tokenizer(folder: Path, *, added: tuple[str, ...] = ("<think>",), config: dict | None = None) -> Path:
    """A Qwen-like byte-level BPE tokenizer (ByteLevel pre-tokenizer, decoder and post-processor) trained by
    `tokenizers`, with <|im_start|>/<|im_end|> added as special tokens and `added` as normal ones, saved as
    transformers 5 saves it: tokenizer.json, tokenizer_config.json, chat_template.jinja."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=TOKENIZER_SIZE, special_tokens=SPECIALS[:1], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["hello world the quick brown fox jumps over the lazy dog, " * 4 + str(i)
                             for i in range(200)], trainer)
    assert tok.get_vocab_size() == TOKENIZER_SIZE
    tok.add_special_tokens(SPECIALS[1:])
    tok.add_tokens(list(added))
    tok.save(str(folder / "tokenizer.json"))
    settings = {"backend": "tokenizers", "eos_token": "<|im_end|>", "model_max_length": 4096,
                "pad_token": "<|endoftext|>", "tokenizer_class": "TokenizersBackend", **(config or {})}
    (folder / "tokenizer_config.json").write_text(json.dumps(settings, indent=2) + "\n")
    (folder / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return folder


def files_of(*folders: Path) -> list[Path]:
    """The side files of folders (weights aside), the later folders' files replacing the earlier's by name."""
    by_name = {}
    for folder in folders:
        for path in sorted(folder.rglob("*")):
            if path.is_file() and path.suffix not in (".safetensors", ".gguf"):
                by_name[path.relative_to(folder)] = path
    return list(by_name.values())


def as_dict(fields: tuple[MetaField, ...]) -> dict[str, MetaField]:
    return {f.key: f for f in fields}


def metadata(arch: str, config: dict, files: list[Path], file_type: int = 32) -> dict[str, MetaField]:
    return as_dict(gguf_metadata(arch, config, files, name="m", size_label="1K", file_type=file_type))


def read_kv(path: Path) -> dict[str, tuple[list[str], object]]:
    """Key -> ([value type, item type...], value) of a GGUF file, in file order, provenance and
    general.architecture left out; the chat template names (a set's order in the converter) sorted."""
    reader = gguf.GGUFReader(path)
    kv = {}
    for field in reader.fields.values():
        if field.name.startswith(("GGUF.", "general.architecture")) or field.name.startswith(PROVENANCE):
            continue
        value = field.contents()
        if field.name == "tokenizer.chat_templates":
            value = sorted(value)
        kv[field.name] = ([gguf.GGUFValueType(t).name for t in field.types], value)
    return kv


def write_ours(fields: tuple[MetaField, ...], arch: str, path: Path) -> Path:
    """Our fields in a GGUF file (no tensors), written as the MetaField docstring says."""
    writer = gguf.GGUFWriter(path, arch)
    for f in fields:
        writer.add_key_value(f.key, f.value, gguf.GGUFValueType[f.kind],
                             sub_type=gguf.GGUFValueType[f.item_kind] if f.item_kind else None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    return path


# ----------------------------------------------------------------------------------------------------------
# against the converter

GENERATION = {"bos_token_id": 0, "do_sample": True, "eos_token_id": [301, 0], "min_p": 0.0,
              "repetition_penalty": 1.05, "temperature": 0.7, "top_k": 20, "top_p": 0.8}
COMMON = dict(vocab_size=320, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=96, max_position_embeddings=512, tie_word_embeddings=False)
NAMED_TEMPLATES = [{"name": "default", "template": CHAT_TEMPLATE}, {"name": "tool use", "template": "T"}]
MODELS = {  # model_type -> (config, outtype, tokenizer: write_tokenizer's arguments, special_tokens_map.json)
    "qwen2": (dict(bos_token_id=0, eos_token_id=301), "bf16", {}, None),
    "qwen3": (dict(head_dim=16, rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6,
                                                 "original_max_position_embeddings": 128, "beta_fast": 16.0,
                                                 "beta_slow": 2.0}), "f16",
              dict(config={"add_bos_token": True, "add_eos_token": False}), None),  # the post-processor decides
    "qwen2_moe": (dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                       shared_expert_intermediate_size=48), "q8_0", dict(config={"chat_template": NAMED_TEMPLATES}),
                  None),
    "qwen3_moe": (dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32), "f32",
                  dict(added=("<think>", "\u2581hi"), config={"unk_token": "hello", "extra_special_tokens": ["<new>"]}),
                  {"mask_token": "<mmm>"}),  # special tokens transformers adds: a vocabulary one, two new ones
}
FILE_TYPES = {"f32": 0, "f16": 1, "q8_0": 7, "bf16": 32}


def build_model(model_type: str, folder: Path) -> Path:
    """A tiny random model saved by transformers, with the tokenizer and the sampling settings."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    settings, _, tokenizer, special_map = MODELS[model_type]
    config = AutoConfig.for_model(model_type, **COMMON, **settings)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(folder)
    write_tokenizer(folder, **tokenizer)
    if special_map:
        (folder / "special_tokens_map.json").write_text(json.dumps(special_map))
    (folder / "generation_config.json").write_text(json.dumps(GENERATION, indent=2) + "\n")
    return folder


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> dict[str, Path]:
    """Each model of MODELS built and converted by llama.cpp's converter (one process for all): its folder."""
    root = tmp_path_factory.mktemp("meta")
    folders = {m: build_model(m, root / f"tiny_{m}") for m in MODELS}
    llamacpp.convert([llamacpp.Job(f, f.parent / f"{f.name}.gguf", MODELS[m][1]) for m, f in folders.items()])
    return folders


@pytest.mark.slow
@pytest.mark.parametrize("model_type", list(MODELS))
def test_fields_equal_the_converters(model_type, converted, tmp_path):
    folder = converted[model_type]
    outtype = MODELS[model_type][1]
    theirs = read_kv(folder.parent / f"{folder.name}.gguf")
    config = json.loads((folder / "config.json").read_text())
    arch = GGUF_ARCHITECTURES[config["architectures"][0]]
    fields = gguf_metadata(arch, config, files_of(folder), name="tiny", size_label="1K",
                           file_type=FILE_TYPES[outtype])
    ours = read_kv(write_ours(fields, arch, tmp_path / "ours.gguf"))
    assert list(ours) == list(theirs)
    for key in theirs:
        assert ours[key] == theirs[key], key
    # what each model exercises is there
    assert theirs["tokenizer.ggml.tokens"][1][-1] == "[PAD319]"
    assert theirs["general.sampling.top_k"] == (["INT32"], 20)
    assert theirs["general.file_type"] == (["UINT32"], FILE_TYPES[outtype])


# ----------------------------------------------------------------------------------------------------------
# the rules, without the converter


QWEN3 = dict(model_type="qwen3", architectures=["Qwen3ForCausalLM"], **COMMON, head_dim=16, rms_norm_eps=1e-6,
             rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    folder = write_tokenizer(tmp_path_factory.mktemp("tokenizer"), added=("<think>", "<|tool|>", "\u2581hi"))
    (folder / "config.json").write_text(json.dumps(QWEN3))
    return folder


def test_tokens_types_and_padding(tokenizer_dir):
    fields = metadata("qwen3", QWEN3, files_of(tokenizer_dir))
    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    assert (tokens.kind, tokens.item_kind, types.kind, types.item_kind) == ("ARRAY", "STRING", "ARRAY", "INT32")
    assert len(tokens.value) == len(types.value) == 320
    kinds = gguf.TokenType
    by_token = dict(zip(tokens.value, types.value))
    assert by_token["<|endoftext|>"] == by_token["<|im_start|>"] == by_token["<|im_end|>"] == kinds.CONTROL
    assert by_token["<|tool|>"] == kinds.CONTROL  # added as a normal token, but looks like a control one
    assert by_token["<think>"] == kinds.USER_DEFINED
    assert by_token[" hi"] == kinds.USER_DEFINED and "\u2581hi" not in by_token  # "▁" written as a space
    assert by_token["hello"] == by_token["Ġworld"] == kinds.NORMAL
    assert tokens.value[305:] == [f"[PAD{i}]" for i in range(305, 320)]
    assert set(types.value[305:]) == {kinds.UNUSED}
    assert fields["tokenizer.ggml.model"].value == "gpt2" and fields["tokenizer.ggml.pre"].value == "qwen2"
    merges = json.loads((tokenizer_dir / "tokenizer.json").read_text())["model"]["merges"]
    assert fields["tokenizer.ggml.merges"].value == [" ".join(pair) for pair in merges]
    assert fields["tokenizer.chat_template"].value == CHAT_TEMPLATE


def test_special_ids_and_add_flags(tokenizer_dir, tmp_path):
    fields = metadata("qwen3", {**QWEN3, "bos_token_id": 0, "eos_token_id": 7}, files_of(tokenizer_dir))
    ids = {k: (f.value, f.kind) for k, f in fields.items() if k.endswith("_token_id") or "add_" in k}
    # eos and pad from tokenizer_config.json (their ids in tokenizer.json), bos from config.json: the
    # tokenizer config names none; config.json's eos_token_id does not override the tokenizer's.
    # The ByteLevel post-processor adds neither bos nor eos.
    assert ids == {"tokenizer.ggml.eos_token_id": (301, "UINT32"), "tokenizer.ggml.padding_token_id": (0, "UINT32"),
                   "tokenizer.ggml.bos_token_id": (0, "UINT32"), "tokenizer.ggml.add_bos_token": (False, "BOOL"),
                   "tokenizer.ggml.add_eos_token": (False, "BOOL")}

    # without a post-processor, the tokenizer config's add_bos_token decides
    folder = write_tokenizer(tmp_path / "plain", config={"add_bos_token": True, "bos_token": "<|endoftext|>"})
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    tokenizer["post_processor"] = None
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    fields = metadata("qwen3", QWEN3, files_of(folder))
    assert fields["tokenizer.ggml.add_bos_token"].value is True
    assert fields["tokenizer.ggml.bos_token_id"].value == 0
    assert "tokenizer.ggml.add_eos_token" not in fields


def test_resized_vocabulary_from_the_adapters_tokenizer(tokenizer_dir, tmp_path):
    """The adapter added tokens (ids 305, 306) and config.json grew to 312: the tokenizer files come from
    the adapter's folder, config and generation settings from the base's."""
    base = tokenizer_dir
    adapter = write_tokenizer(tmp_path / "adapter", added=("<think>", "<|tool|>", "\u2581hi", "</think>", "<x>"))
    config = {**QWEN3, "vocab_size": 312}
    files = [base / "config.json", *(adapter / n for n in ("tokenizer.json", "tokenizer_config.json",
                                                           "chat_template.jinja"))]
    fields = metadata("qwen3", config, files)
    tokens, types = fields["tokenizer.ggml.tokens"].value, fields["tokenizer.ggml.token_type"].value
    assert tokens[305:] == ["</think>", "<x>"] + [f"[PAD{i}]" for i in range(307, 312)]
    assert types[305:307] == [gguf.TokenType.USER_DEFINED] * 2

    with pytest.raises(FormatError) as caught:  # the base's vocab_size is too small for the adapter's tokenizer
        metadata("qwen3", {**QWEN3, "vocab_size": 306}, files)
    line = str(caught.value)
    assert "\n" not in line and "tokenizer.json" in line and "token id 306" in line and "vocab_size 306" in line


def test_special_tokens_transformers_adds(tokenizer_dir, tmp_path):
    """transformers adds the special tokens the tokenizer config names and tokenizer.json lacks: one in the
    vocabulary becomes a special (CONTROL) token, a new one gets the next id."""
    folder = write_tokenizer(tmp_path / "named", config={"unk_token": "hello", "extra_special_tokens": ["<new>"]})
    tokens, types = (metadata("qwen3", QWEN3, files_of(folder))[k].value
                     for k in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type"))
    assert types[tokens.index("hello")] == gguf.TokenType.CONTROL
    assert tokens[303] == "<new>" and types[303] == gguf.TokenType.CONTROL


def test_rope_scaling(tokenizer_dir):
    files = files_of(tokenizer_dir)
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128, "rope_theta": 5e5,
            "attention_factor": 1.25, "beta_fast": 32, "beta_slow": 1}
    fields = metadata("qwen3", {**QWEN3, "rope_parameters": yarn}, files)
    rope = {k.removeprefix("qwen3."): (f.value, f.kind) for k, f in fields.items() if ".rope." in k}
    assert rope == {"rope.scaling.type": ("yarn", "STRING"), "rope.scaling.factor": (4.0, "FLOAT32"),
                    "rope.scaling.original_context_length": (128, "UINT32"),
                    "rope.scaling.yarn_attn_factor": (1.25, "FLOAT32"),
                    "rope.scaling.yarn_beta_fast": (32.0, "FLOAT32"), "rope.scaling.yarn_beta_slow": (1.0, "FLOAT32"),
                    "rope.freq_base": (5e5, "FLOAT32")}
    assert list(fields).index("qwen3.rope.scaling.type") == list(fields).index("qwen3.attention.head_count_kv") + 1

    # transformers 4's spelling: rope_scaling with "type", rope_theta beside it; no original length = the context
    old = {k: v for k, v in QWEN3.items() if k != "rope_parameters"}
    old.update(rope_theta=5e5, rope_scaling={"type": "yarn", "factor": 4.0})
    fields = metadata("qwen3", old, files)
    assert fields["qwen3.rope.scaling.original_context_length"].value == 512
    assert fields["qwen3.rope.freq_base"].value == 5e5

    linear = metadata("qwen2", {**old, "rope_scaling": {"type": "linear", "factor": 2.0}}, files)
    assert [(k, f.value) for k, f in linear.items() if ".rope." in k] == [
        ("qwen2.rope.scaling.type", "linear"), ("qwen2.rope.scaling.factor", 2.0), ("qwen2.rope.freq_base", 5e5)]
    plain = metadata("qwen2", {**QWEN3, "rope_parameters": None, "rope_theta": 20000}, files)
    assert [(k, f.value) for k, f in plain.items() if ".rope." in k] == [("qwen2.rope.freq_base", 20000.0)]


def test_hyperparameters_and_defaults(tokenizer_dir):
    """Hyperparameters in the converter's order, general.file_type among them; a key config.json leaves
    out takes transformers' default (Qwen3's head_dim 128; 32 key/value heads), as the converter's loaded
    config has it."""
    sparse = {k: v for k, v in QWEN3.items() if k not in ("head_dim", "num_key_value_heads")}
    fields = metadata("qwen3", sparse, files_of(tokenizer_dir), file_type=7)
    keys = [k for k in fields if not k.startswith("tokenizer.")]
    assert keys == ["general.type", "general.name", "general.size_label", "qwen3.block_count",
                    "qwen3.context_length", "qwen3.embedding_length", "qwen3.feed_forward_length",
                    "qwen3.attention.head_count", "qwen3.attention.head_count_kv", "qwen3.rope.freq_base",
                    "qwen3.attention.layer_norm_rms_epsilon", "qwen3.attention.key_length",
                    "qwen3.attention.value_length", "general.file_type", "general.quantization_version"]
    assert fields["qwen3.attention.key_length"].value == 128 and fields["qwen3.attention.head_count_kv"].value == 32
    assert fields["general.file_type"].value == 7 and fields["general.quantization_version"].value == 2
    qwen2 = metadata("qwen2", sparse, files_of(tokenizer_dir))
    assert "qwen2.attention.key_length" not in qwen2  # only a config with head_dim gives Qwen2 one

    moe = metadata("qwen3moe", {**QWEN3, "num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32},
                   files_of(tokenizer_dir))
    keys = list(moe)
    assert keys[keys.index("qwen3moe.attention.layer_norm_rms_epsilon"):keys.index("general.quantization_version")] \
        == ["qwen3moe.attention.layer_norm_rms_epsilon", "qwen3moe.expert_count", "qwen3moe.expert_used_count",
            "qwen3moe.attention.key_length", "qwen3moe.attention.value_length", "general.file_type",
            "qwen3moe.expert_feed_forward_length"]


def test_sampling_settings(tokenizer_dir, tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps(GENERATION))
    fields = gguf_metadata("qwen3", QWEN3, [*files_of(tokenizer_dir), tmp_path / "generation_config.json"],
                           name="tiny", size_label="1K", file_type=32)
    assert [(f.key, f.value, f.kind) for f in fields[:8]] == [
        ("general.type", "model", "STRING"), ("general.sampling.top_k", 20, "INT32"),
        ("general.sampling.top_p", 0.8, "FLOAT32"), ("general.sampling.min_p", 0.0, "FLOAT32"),
        ("general.sampling.temp", 0.7, "FLOAT32"), ("general.sampling.penalty_repeat", 1.05, "FLOAT32"),
        ("general.name", "tiny", "STRING"), ("general.size_label", "1K", "STRING")]


def test_named_chat_templates(tokenizer_dir, tmp_path):
    folder = write_tokenizer(tmp_path / "named", config={"chat_template": [
        {"name": "default", "template": "D"}, {"name": "tool use", "template": "T"}, {"name": "rag", "template": "R"}]})
    fields = metadata("qwen3", QWEN3, files_of(folder))  # tokenizer_config.json's wins over chat_template.jinja
    assert [(k, f.value) for k, f in fields.items() if "chat_template" in k] == [
        ("tokenizer.chat_template.tool_use", "T"), ("tokenizer.chat_template.rag", "R"),
        ("tokenizer.chat_templates", ["rag", "tool_use"]), ("tokenizer.chat_template", "D")]

    # chat_template.jinja, with more templates in additional_chat_templates/ (and none in the tokenizer config)
    folder = shutil.copytree(tokenizer_dir, tmp_path / "more")
    (folder / "additional_chat_templates").mkdir()
    (folder / "additional_chat_templates" / "rag.jinja").write_text("R")
    fields = metadata("qwen3", QWEN3, files_of(folder))
    assert [(k, f.value) for k, f in fields.items() if "chat_template" in k] == [
        ("tokenizer.chat_template.rag", "R"), ("tokenizer.chat_templates", ["rag"]),
        ("tokenizer.chat_template", CHAT_TEMPLATE)]


def test_refusals_are_one_line(tokenizer_dir, tmp_path):
    def refusal(files: list[Path], arch: str = "qwen3") -> str:
        with pytest.raises(FormatError) as caught:
            metadata(arch, QWEN3, files)
        assert "\n" not in str(caught.value)
        return str(caught.value)

    line = refusal([tokenizer_dir / "tokenizer_config.json", tokenizer_dir / "config.json"])
    assert line.startswith("tokenizer.json: ") and "found tokenizer_config.json" in line

    (tmp_path / "vocab.json").write_text("{}")
    (tmp_path / "merges.txt").write_text("")
    line = refusal([tmp_path / "vocab.json", tmp_path / "merges.txt"])
    assert "found vocab.json, merges.txt" in line and "save_pretrained writes tokenizer.json" in line

    tokenizer = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    tokenizer["model"]["type"] = "Unigram"
    (tmp_path / "tokenizer.json").write_text(json.dumps(tokenizer))
    line = refusal([tmp_path / "tokenizer.json"])
    assert line.startswith(f"{tmp_path / 'tokenizer.json'}: ")
    assert "needs a BPE tokenizer, found a Unigram model" in line

    (tmp_path / "tokenizer.model").write_bytes(b"\0")
    line = refusal([tokenizer_dir / "tokenizer.json", tmp_path / "tokenizer.model"], arch="qwen2")
    assert line.startswith(f"{tmp_path / 'tokenizer.model'}: ") and "remove tokenizer.model" in line


def test_written_types_and_names(tokenizer_dir, tmp_path):
    """Every kind is a GGUFValueType name, and GGUFWriter.add_key_value writes each field with its kind."""
    fields = gguf_metadata("qwen3", QWEN3, files_of(tokenizer_dir), name="m", size_label="1K", file_type=1)
    written = read_kv(write_ours(fields, "qwen3", tmp_path / "m.gguf"))
    for f in fields:
        if not f.key.startswith(PROVENANCE):
            assert written[f.key][0] == [f.kind] + ([f.item_kind] if f.item_kind else []), f.key
    assert "general.file_type" in written and "tokenizer.ggml.token_type" in written
    assert set(GGUF_ARCHITECTURES.values()) <= set(gguf.MODEL_ARCH_NAMES.values())


def test_import_needs_no_gguf():
    code = "import sys, qwen_merge.planning.ggufmeta; assert 'gguf' not in sys.modules and 'torch' not in sys.modules"
    assert run_python(code).returncode == 0
