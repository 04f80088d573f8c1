"""The metadata (key/value) section of a GGUF file, field for field as llama.cpp's converter writes it.

`gguf_metadata` computes every field after `general.architecture` for the four architectures the GGUF
output supports, from the output's config.json and side files alone: no transformers, no `tokenizers`,
no gguf package (the values and GGUF value types are spelled here; the tests compare them with a file the
converter wrote). The order is the converter's:

* general: `type`, the sampling settings of generation_config.json, `name`, `size_label`;
* the hyperparameters, read from config.json the way transformers' config class reads it (its defaults
  for missing keys, `rope_scaling` and a top-level `rope_theta` folded into `rope_parameters`), with
  `general.file_type` among them where the converter writes it, then `general.quantization_version`;
* the vocabulary (a GPT-2 style byte-level BPE for all four): model, pre-tokenizer, tokens for every id
  below the config's `vocab_size`, token types, merges, special token ids, add-bos/eos flags, chat
  template(s), normalizer flags.

Provenance fields the converter guesses from a README or the folder's name (author, license, base
models, tags...) are not written: the name and size label come from the caller.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import FormatError
from ..files import read_json

GGUF_ARCHITECTURES = {
    "Qwen2ForCausalLM": "qwen2",
    "Qwen2MoeForCausalLM": "qwen2moe",
    "Qwen3ForCausalLM": "qwen3",
    "Qwen3MoeForCausalLM": "qwen3moe",
}
QUANTIZATION_VERSION = 2  # gguf's GGML_QUANT_VERSION
TOKENIZER_PRE = "qwen2"  # what the converter's pre-tokenizer hash names every Qwen2/Qwen3 tokenizer

# gguf.TokenType values
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5

# transformers' config defaults (5.x) for the keys read here, by GGUF architecture: a config.json that
# leaves one out gets the class's value, and so does the converter, which reads the loaded config.
_DEFAULTS = {
    "qwen2": dict(vocab_size=151936, max_position_embeddings=32768, hidden_size=4096, intermediate_size=22016,
                  num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32),
    "qwen3": dict(vocab_size=151936, max_position_embeddings=32768, hidden_size=4096, intermediate_size=22016,
                  num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, head_dim=128),
    "qwen2moe": dict(vocab_size=151936, max_position_embeddings=32768, hidden_size=2048, intermediate_size=5632,
                     num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=16, num_experts=60,
                     num_experts_per_tok=4, moe_intermediate_size=1408, shared_expert_intermediate_size=5632),
    "qwen3moe": dict(vocab_size=151936, max_position_embeddings=32768, hidden_size=2048, intermediate_size=6144,
                     num_hidden_layers=24, num_attention_heads=32, num_key_value_heads=4, num_experts=128,
                     num_experts_per_tok=8, moe_intermediate_size=768),
}
_COMMON_DEFAULTS = dict(rms_norm_eps=1e-6, rope_theta=10000.0)

# generation_config.json key(s) -> general.sampling.* key and its type, in the converter's order
_SAMPLING = (
    (("sequence",), "sequence", "STRING"),
    (("top_k",), "top_k", "INT32"),
    (("top_p",), "top_p", "FLOAT32"),
    (("min_p",), "min_p", "FLOAT32"),
    (("xtc_probability",), "xtc_probability", "FLOAT32"),
    (("xtc_threshold",), "xtc_threshold", "FLOAT32"),
    (("temperature",), "temp", "FLOAT32"),
    (("penalty_last_n",), "penalty_last_n", "INT32"),
    (("penalty_repeat", "repetition_penalty"), "penalty_repeat", "FLOAT32"),
    (("mirostat",), "mirostat", "INT32"),
    (("mirostat_tau",), "mirostat_tau", "FLOAT32"),
    (("mirostat_eta",), "mirostat_eta", "FLOAT32"),
)

# The special token kinds the converter looks up, and the GGUF key of those it writes (cls has none).
_SPECIAL_KINDS = ("bos", "eos", "unk", "sep", "pad", "cls", "mask")
_SPECIAL_ID_KEYS = {"bos": "bos_token_id", "eos": "eos_token_id", "unk": "unknown_token_id",
                    "sep": "seperator_token_id", "pad": "padding_token_id", "mask": "mask_token_id"}
_ADD_FLAG_KINDS = ("bos", "eos", "sep")  # the add_<kind>_token flags a GGUF file has


@dataclass(frozen=True, slots=True)
class MetaField:
    """One metadata key/value. `kind` is the `gguf.GGUFValueType` member name of the value ("STRING",
    "UINT32", "INT32", "FLOAT32", "BOOL", "ARRAY"); for an ARRAY, `item_kind` names its items' type.

    Writing one with gguf's GGUFWriter gives the bytes the converter's typed `add_*` calls give:
    `writer.add_key_value(f.key, f.value, GGUFValueType[f.kind],
    sub_type=GGUFValueType[f.item_kind] if f.item_kind else None)`."""

    key: str
    value: object
    kind: str
    item_kind: str | None = None


def gguf_metadata(arch: str, config: Mapping, side_files: Sequence[Path], *, name: str, size_label: str,
                  file_type: int) -> tuple[MetaField, ...]:
    """Every metadata field after general.architecture, in the converter's order. `arch`: the GGUF arch name
    (a value of GGUF_ARCHITECTURES); `config`: the output's config.json as a dict (already updated for a
    resized vocabulary); `side_files`: the output's side files (found by file name: generation_config.json,
    tokenizer.json, tokenizer_config.json, chat_template.jinja, chat_template.json, merges.txt...); `name`:
    general.name; `size_label`: general.size_label; `file_type`: general.file_type (gguf.LlamaFileType: f32 0,
    f16 1, q8_0 7, bf16 32). Raises FormatError when the tokenizer is not one the converter turns into a GPT-2
    BPE vocabulary (no tokenizer.json, another model type, an id at or past vocab_size)."""
    if arch not in _DEFAULTS:
        raise ValueError(f"not a GGUF architecture this module knows: {arch!r}")
    files = _files_by_name(side_files)
    hparams = _hparams(arch, config)
    fields = [MetaField("general.type", "model", "STRING"), *_sampling(files.get("generation_config.json")),
              MetaField("general.name", name, "STRING"), MetaField("general.size_label", size_label, "STRING"),
              *_hyperparameters(arch, hparams, file_type),
              MetaField("general.quantization_version", QUANTIZATION_VERSION, "UINT32"),
              *_vocabulary(arch, hparams, config, files)]
    # gguf's add_string and add_array skip an empty value
    return tuple(f for f in fields if not (f.kind in ("STRING", "ARRAY") and len(f.value) == 0))


def _files_by_name(side_files: Sequence[Path]) -> dict[str, Path | list[Path]]:
    """Side files by file name; the additional chat templates (additional_chat_templates/*.jinja) as a list
    under "additional_chat_templates", sorted by name."""
    files: dict = {}
    extra = sorted((Path(p) for p in side_files if Path(p).parent.name == "additional_chat_templates"
                    and Path(p).suffix == ".jinja"), key=lambda p: p.name)
    for path in map(Path, side_files):
        if path not in extra:
            files[path.name] = path
    files["additional_chat_templates"] = extra
    return files


# ----------------------------------------------------------------------------------------------------------
# general.* and the hyperparameters


def _sampling(path: Path | None) -> list[MetaField]:
    """general.sampling.* from generation_config.json; the converter ignores a file that is not valid JSON."""
    try:
        generation = json.loads(path.read_text(encoding="utf-8")) if path else {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        generation = {}
    if not isinstance(generation, dict):
        generation = {}
    fields = []
    for sources, key, kind in _SAMPLING:
        value = next((generation[s] for s in sources if s in generation), None)
        if value is not None:
            fields.append(MetaField(f"general.sampling.{key}", _typed(value, kind), kind))
    return fields


def _typed(value: object, kind: str) -> object:
    return float(value) if kind == "FLOAT32" else int(value) if kind in ("INT32", "UINT32") else value


def _hparams(arch: str, config: Mapping) -> dict:
    """config.json as transformers' config class loads it: defaults for missing keys (a null
    num_key_value_heads means one per attention head), Qwen3-MoE's `num_experts` named `num_local_experts`,
    and `rope_parameters` that hold the rope type and theta, whatever the file's transformers version."""
    hparams = {**_COMMON_DEFAULTS, **_DEFAULTS[arch], **config}
    if hparams.get("num_key_value_heads") is None:
        hparams["num_key_value_heads"] = hparams["num_attention_heads"]
    rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    if "type" in rope and "rope_type" not in rope:
        rope["rope_type"] = rope["type"]
    rope.setdefault("rope_type", "default")
    rope.setdefault("rope_theta", hparams["rope_theta"])
    if rope["rope_type"] == "yarn":
        rope.setdefault("original_max_position_embeddings", hparams["max_position_embeddings"])
    hparams["rope_parameters"] = rope
    return hparams


def _hyperparameters(arch: str, hparams: Mapping, file_type: int) -> list[MetaField]:
    """The converter's set_gguf_parameters for these architectures, general.file_type included. Keys it writes
    only for configs these architectures' transformers classes never produce (a non-causal flag, M-RoPE
    sections, LayerNorm epsilons, expert groups, router score functions) are left out."""
    def uint(key: str, value: int) -> MetaField:
        return MetaField(f"{arch}.{key}", int(value), "UINT32")

    def real(key: str, value: float) -> MetaField:
        return MetaField(f"{arch}.{key}", float(value), "FLOAT32")

    fields = [uint("block_count", hparams["num_hidden_layers"]),
              uint("context_length", hparams["max_position_embeddings"]),
              uint("embedding_length", hparams["hidden_size"]),
              uint("feed_forward_length", hparams["intermediate_size"]),
              uint("attention.head_count", hparams["num_attention_heads"]),
              uint("attention.head_count_kv", hparams["num_key_value_heads"]),
              *_rope_scaling(arch, hparams["rope_parameters"]),
              real("rope.freq_base", hparams["rope_parameters"]["rope_theta"]),
              real("attention.layer_norm_rms_epsilon", hparams["rms_norm_eps"])]
    experts = next((hparams[k] for k in ("num_local_experts", "num_experts") if k in hparams), None)
    if experts is not None:
        fields.append(uint("expert_count", experts))
    if hparams.get("num_experts_per_tok") is not None:
        fields.append(uint("expert_used_count", hparams["num_experts_per_tok"]))
    if hparams.get("head_dim") is not None:
        fields += [uint("attention.key_length", hparams["head_dim"]),
                   uint("attention.value_length", hparams["head_dim"])]
    fields.append(MetaField("general.file_type", int(file_type), "UINT32"))
    if arch in ("qwen2moe", "qwen3moe"):  # the MoE classes add these after the common ones
        if hparams.get("moe_intermediate_size") is not None:
            fields.append(uint("expert_feed_forward_length", hparams["moe_intermediate_size"]))
        if hparams.get("shared_expert_intermediate_size") is not None:
            fields.append(uint("expert_shared_feed_forward_length", hparams["shared_expert_intermediate_size"]))
    return fields


def _rope_scaling(arch: str, rope: Mapping) -> list[MetaField]:
    """rope.scaling.*: linear and YaRN with a factor (YaRN's optional fields when the config has them), the
    type alone for LongRoPE; the "default" type and others write nothing."""
    kind, factor = rope["rope_type"], rope.get("factor")
    prefix = f"{arch}.rope.scaling"
    if kind in ("linear", "yarn") and factor is not None:
        fields = [MetaField(f"{prefix}.type", kind, "STRING"), MetaField(f"{prefix}.factor", float(factor), "FLOAT32")]
        if kind == "yarn":
            fields.append(MetaField(f"{prefix}.original_context_length",
                                    int(rope["original_max_position_embeddings"]), "UINT32"))
            optional = (("yarn_ext_factor", ("extrapolation_factor",)),
                        ("yarn_attn_factor", ("attention_factor", "attn_factor")),
                        ("yarn_beta_fast", ("beta_fast",)), ("yarn_beta_slow", ("beta_slow",)))
            for key, sources in optional:
                value = next((rope[s] for s in sources if s in rope), None)
                if value is not None:
                    fields.append(MetaField(f"{prefix}.{key}", float(value), "FLOAT32"))
        return fields
    if kind in ("su", "longrope"):
        return [MetaField(f"{prefix}.type", "longrope", "STRING")]
    return []


# ----------------------------------------------------------------------------------------------------------
# the vocabulary


def _vocabulary(arch: str, hparams: Mapping, config: Mapping, files: Mapping) -> list[MetaField]:
    """tokenizer.*: the token list and types, then what gguf's SpecialVocab adds (merges, special ids,
    add-bos/eos flags, chat templates, normalizer flags)."""
    tokenizer_json = _tokenizer_json(arch, files)
    tokenizer = read_json(tokenizer_json, "the tokenizer")
    model = tokenizer.get("model") or {}
    if model.get("type") != "BPE":
        raise FormatError(f"{tokenizer_json}: a GGUF file of a {arch} model needs a BPE tokenizer, found a "
                          f"{model.get('type') or 'untyped'} model; write the GGUF from a model with a BPE tokenizer")
    added = [t for t in tokenizer.get("added_tokens") or [] if isinstance(t, dict)]
    tokenizer_config = _optional_json(files, "tokenizer_config.json", "the tokenizer config")
    special_map = _optional_json(files, "special_tokens_map.json", "the special tokens map")
    tokens, types = _tokens(tokenizer_json, model, _added_tokens(model, added, tokenizer_config, special_map),
                            int(hparams["vocab_size"]))
    return [MetaField("tokenizer.ggml.model", "gpt2", "STRING"),
            MetaField("tokenizer.ggml.pre", TOKENIZER_PRE, "STRING"),
            MetaField("tokenizer.ggml.tokens", tokens, "ARRAY", "STRING"),
            MetaField("tokenizer.ggml.token_type", types, "ARRAY", "INT32"),
            *_special_vocab(tokenizer, added, tokenizer_config, config, files)]


def _optional_json(files: Mapping, name: str, what: str) -> dict:
    return read_json(files[name], what) if name in files else {}


def _tokenizer_json(arch: str, files: Mapping) -> Path:
    """tokenizer.json, which the converter needs (it builds the vocabulary from a fast tokenizer)."""
    if "tokenizer.model" in files and arch in ("qwen2", "qwen3"):
        # the converter's Qwen2/Qwen3 classes take a SentencePiece tokenizer.model first, when there is one
        raise FormatError(f"{files['tokenizer.model']}: a GGUF file of a {arch} model is written with its BPE "
                          f"tokenizer.json, found a SentencePiece tokenizer.model beside it; remove "
                          f"tokenizer.model if tokenizer.json is the model's tokenizer")
    if "tokenizer.json" in files:
        return files["tokenizer.json"]
    found = ", ".join(n for n in ("vocab.json", "merges.txt", "vocab.txt", "tokenizer_config.json") if n in files)
    hint = ("load the tokenizer with transformers' AutoTokenizer and save it (save_pretrained writes tokenizer.json)"
            if "vocab.json" in files else "add the model's tokenizer files")
    raise FormatError(f"tokenizer.json: a GGUF file needs the fast tokenizer's tokenizer.json, found "
                      f"{found or 'no tokenizer files'}; {hint}")


def _tokens(path: Path, model: Mapping, added: Mapping[int, tuple[str, bool]],
            vocab_size: int) -> tuple[list[str], list[int]]:
    """The token of every id below vocab_size, and its type. The fast tokenizer's vocabulary is the model's
    plus the added tokens; an id without a token becomes "[PAD<id>]" (UNUSED). An added token is CONTROL when
    special or when it looks like a control token (`<|...|>`), else USER_DEFINED with "▁" written as a space.
    (The converter round-trips non-normalized added tokens through encode and decode first; a whole added token
    encodes to its own id and decodes to its own content, so that is the identity.)"""
    by_id = {int(i): str(t) for t, i in (model.get("vocab") or {}).items()}
    by_id.update((i, content) for i, (content, _) in added.items())
    if by_id and max(by_id) >= vocab_size:
        raise FormatError(f"{path}: token id {max(by_id)} is past the model's vocabulary (config.json "
                          f"vocab_size {vocab_size}); the tokenizer does not belong to this model, or config.json's "
                          f"vocab_size must grow (resize the embeddings)")
    tokens, types = [], []
    for i in range(vocab_size):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
        elif i in added:
            if added[i][1] or _looks_special(token):
                types.append(CONTROL)
            else:
                token = token.replace("\u2581", " ")
                types.append(USER_DEFINED)
            tokens.append(token)
        else:
            tokens.append(token)
            types.append(NORMAL)
    return tokens, types


def _added_tokens(model: Mapping, added: list[dict], tokenizer_config: Mapping,
                  special_map: Mapping) -> dict[int, tuple[str, bool]]:
    """id -> (content, special) of the added tokens as transformers loads them: tokenizer.json's, then the
    special tokens the tokenizer config names (special_tokens_map.json on top; bos, eos, unk, sep, pad, cls,
    mask, then the extra ones) that tokenizer.json does not add: one in the model's vocabulary becomes a
    special added token with its id, a new one gets the next id."""
    tokens = {int(t["id"]): (str(t["content"]), bool(t.get("special"))) for t in added}
    named = {**tokenizer_config, **special_map}
    extra = named.get("extra_special_tokens") or named.get("additional_special_tokens") or []
    if isinstance(extra, Mapping):
        extra = list(extra.values())
    vocab = model.get("vocab") or {}
    for entry in [named.get(f"{kind}_token") for kind in _SPECIAL_KINDS] + list(extra):
        content = entry.get("content") if isinstance(entry, Mapping) else entry
        if not isinstance(content, str) or any(c == content for c, _ in tokens.values()):
            continue
        token_id = vocab.get(content)
        if token_id is None:
            token_id = max([*map(int, vocab.values()), *tokens], default=-1) + 1
        tokens[int(token_id)] = (content, True)
    return tokens


def _looks_special(token: str) -> bool:
    """Added tokens the converter marks CONTROL though the tokenizer does not call them special."""
    return (token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
            or (token.startswith("<|") and token.endswith("|>"))
            or (token.startswith("<\uff5c") and token.endswith("\uff5c>"))
            or (token.startswith("<unused") and token.endswith(">")))


def _special_vocab(tokenizer: Mapping, added: list[dict], tokenizer_config: dict, config: Mapping,
                   files: Mapping) -> list[MetaField]:
    """What gguf's SpecialVocab (llama.cpp's own copy, which the converter uses) writes, in its order."""
    merges = _merges(tokenizer, files)
    add_flags = _post_processor_flags(tokenizer.get("post_processor"))
    ids: dict[str, int] = {}
    chat_template = None
    if tokenizer_config:  # SpecialVocab reads none of these without a tokenizer config
        chat_template = _chat_template(tokenizer_config, files)
        config_names = _special_token_names(tokenizer_config)
        for kind in _SPECIAL_KINDS:
            flag = tokenizer_config.get(f"add_{kind}_token")
            if isinstance(flag, bool):
                add_flags.setdefault(kind, flag)  # the post-processor decides first
            content = config_names.get(kind)
            token_id = next((t.get("id") for t in added if t.get("content") == content), None) if content else None
            _set_special_id(ids, kind, token_id, files.get("tokenizer_config.json"))
    for kind in _SPECIAL_KINDS:
        _set_special_id(ids, kind, config.get(f"{kind}_token_id"), "config.json")
    fields = [MetaField("tokenizer.ggml.merges", merges, "ARRAY", "STRING")] if merges else []
    fields += [MetaField(f"tokenizer.ggml.{_SPECIAL_ID_KEYS[k]}", v, "UINT32") for k, v in ids.items()
               if k in _SPECIAL_ID_KEYS]
    fields += [MetaField(f"tokenizer.ggml.add_{k}_token", v, "BOOL") for k, v in add_flags.items()
               if k in _ADD_FLAG_KINDS]
    fields += _chat_template_fields(chat_template)
    fields += _normalizer_flags(tokenizer.get("normalizer"))
    return fields


def _merges(tokenizer: Mapping, files: Mapping) -> list[str]:
    """tokenizer.json's merges as "a b" strings (a space inside a pair's part written as U+0120, as
    byte-level BPE spells a space); merges.txt when tokenizer.json has none."""
    merges = (tokenizer.get("model") or {}).get("merges") or []
    if merges:
        if isinstance(merges[0], str):
            return list(merges)
        return [" ".join(part.replace(" ", "\u0120") for part in pair) for pair in merges]
    path = files.get("merges.txt")
    if path is None:
        return []
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    if lines and lines[0].startswith("#"):
        lines = lines[1:]
    return [" ".join(parts) for parts in (line.split() for line in lines if line) if len(parts) == 2]


def _post_processor_flags(post_processor: Mapping | None) -> dict[str, bool]:
    """add_bos/add_eos/add_sep as the tokenizer's post-processor decides them: a ByteLevel one (Qwen's) adds
    neither, a RoBERTa one adds all three, a template adds bos/eos when it starts/ends with a special token.
    (The converter also infers bos/eos/sep tokens from a template; these architectures' tokenizers have none.)"""
    flags: dict[str, bool] = {}
    if not post_processor:
        return flags
    for processor in post_processor.get("processors", [post_processor]):
        kind = processor.get("type")
        if kind == "ByteLevel":
            flags.setdefault("bos", False)
            flags.setdefault("eos", False)
        elif kind == "RobertaProcessing":
            flags.update(bos=True, eos=True, sep=True)
        elif kind == "TemplateProcessing":
            single = processor.get("single") or []
            if len(single) > 1:
                if "SpecialToken" in single[0]:
                    flags["bos"] = True
                if "SpecialToken" in single[-1]:
                    flags["eos"] = True
    return flags


def _special_token_names(tokenizer_config: Mapping) -> dict[str, str]:
    """The special tokens' contents the tokenizer config names (a string or an AddedToken-like dict); bos
    falls back to cls and eos to sep, as SpecialVocab does."""
    names = {}
    for kind in _SPECIAL_KINDS:
        entry = tokenizer_config.get(f"{kind}_token")
        content = entry.get("content") if isinstance(entry, dict) else entry
        if isinstance(content, str):
            names[kind] = content
    if not tokenizer_config.get("bos_token") and tokenizer_config.get("cls_token") and "cls" in names:
        names["bos"] = names["cls"]
    if not tokenizer_config.get("eos_token") and tokenizer_config.get("sep_token") and "sep" in names:
        names["eos"] = names["sep"]
    return names


def _set_special_id(ids: dict[str, int], kind: str, token_id: object, source: object) -> None:
    """The first id found for a kind wins; a non-integer is no id."""
    if not isinstance(token_id, int) or kind in ids:
        return
    if token_id < 0:
        raise FormatError(f"{source}: {kind} token id {token_id} is negative; expected a token id (0 or more) "
                          f"or null; fix the file")
    ids[kind] = token_id


def _chat_template(tokenizer_config: Mapping, files: Mapping) -> str | list | None:
    """tokenizer_config.json's chat_template; else chat_template.jinja (a list with name "default" when
    additional_chat_templates/*.jinja exist beside it); else chat_template.json's."""
    alternative = None
    if "chat_template.jinja" in files:
        alternative = files["chat_template.jinja"].read_text(encoding="utf-8")
        if files["additional_chat_templates"]:
            alternative = [{"name": "default", "template": alternative}] + [
                {"name": p.stem, "template": p.read_text(encoding="utf-8")} for p in files["additional_chat_templates"]]
    elif "chat_template.json" in files:
        alternative = read_json(files["chat_template.json"], "the chat template").get("chat_template")
    template = tokenizer_config.get("chat_template", alternative)
    return template if isinstance(template, (str, list)) else None


def _chat_template_fields(template: str | list | None) -> list[MetaField]:
    """tokenizer.chat_template, and for a list of named templates tokenizer.chat_template.<name> each plus
    tokenizer.chat_templates (their names; the converter's order is a set's, so any order; sorted here)."""
    if template is None or isinstance(template, str):
        return [MetaField("tokenizer.chat_template", template, "STRING")] if template else []
    named, default = {}, None  # a repeated name keeps its first place and its last template, as gguf writes it
    for choice in template:
        name = "".join(c if c.isascii() and c.isalnum() else "_" for c in str(choice.get("name", "")))
        text = choice.get("template")
        if not name or text is None:
            continue
        if name == "default":
            default = text
        else:
            named[name] = text
    fields = [MetaField(f"tokenizer.chat_template.{name}", text, "STRING") for name, text in named.items()]
    if named:
        fields.append(MetaField("tokenizer.chat_templates", sorted(named), "ARRAY", "STRING"))
    if default is not None:
        fields.append(MetaField("tokenizer.chat_template", default, "STRING"))
    return fields


def _normalizer_flags(normalizer: Mapping | None) -> list[MetaField]:
    """tokenizer.ggml.normalizer.lowercase / strip_accents from a Lowercase, StripAccents or BERT normalizer
    (inside a Sequence too)."""
    flags: dict[str, bool] = {}

    def visit(node: Mapping) -> None:
        kind = node.get("type")
        if kind == "Lowercase":
            flags["lowercase"] = True
        elif kind == "StripAccents":
            flags["strip_accents"] = True
        elif kind == "BertNormalizer":
            for key in ("lowercase", "strip_accents"):
                if key in node:
                    flags[key] = node[key]
        elif kind == "Sequence":
            for child in node.get("normalizers", []):
                visit(child)

    if normalizer:
        visit(normalizer)
    return [MetaField(f"tokenizer.ggml.normalizer.{key}", flags[key], "BOOL")
            for key in ("lowercase", "strip_accents") if flags.get(key) is not None]
