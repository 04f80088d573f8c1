"""Tiny real checkpoints and real PEFT adapters carrying every LoRA artifact of issue 3.

Bases are random tiny Qwen3 models (hidden 32, 2 layers, vocab 256, bf16, 3 shards) written by
transformers' ``save_pretrained``: untied and tied, with and without attention biases. Two bases are
derived on the byte level from real ones:
* ``tied_stored``: the tied base plus an ``lm_head.weight`` (a copy of the embedding) in the last
  shard and the index, as older / hub checkpoints ship it (transformers v5 drops it on save);
* ``untied_vlm``: the untied base with every ``model.*`` key renamed to ``model.language_model.*``
  (the on-disk layout of a vision-language wrapper).

Adapters are built with ``get_peft_model(..., LoraConfig(init_lora_weights=False, ...))`` and then
"trained" (:func:`simulate_training`): every trainable parameter PEFT created is perturbed with seeded
noise, so magnitudes, trainable-token rows, ``modules_to_save`` copies and saved biases really differ
from their initial values (PEFT initialises them *equal* to the base, which would make a merge that
ignores them pass). Then ``PeftModel.save_pretrained`` writes them. Nothing is hand-assembled except
where a table entry says so (key renames for the VLM cases).

References come from the real libraries only: PEFT ``merge_and_unload`` on a transformers model,
and the un-merged ``PeftModel`` for logits.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fixtures_models import PREFIX, checkpoint_tensors, read_header, shard_files, to_tensor, ulp_distance

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
LINEAR = ATTN + MLP
VOCAB = 256
HIDDEN = 32
LAYERS = 2
EMBED = "model.embed_tokens.weight"
HEAD = "lm_head.weight"


# --------------------------------------------------------------------------------------------------
# Variant tables


@dataclass(frozen=True)
class ABase:
    tie: bool = False
    bias: bool = False  # Qwen3Config(attention_bias=...): q/k/v/o biases
    seed: int = 0
    derive: str | None = None  # "lm_head_stored" or "vlm_keys": byte-level edit of another base
    source: str | None = None  # the base that `derive` starts from


ABASES: dict[str, ABase] = {
    "untied": ABase(seed=41),
    "untied_bias": ABase(bias=True, seed=42),
    "tied": ABase(tie=True, seed=43),
    "tied_bias": ABase(tie=True, bias=True, seed=44),
    "tied_stored": ABase(tie=True, derive="lm_head_stored", source="tied"),
    "untied_vlm": ABase(derive="vlm_keys", source="untied"),
    # the untied base plus a second copy of every model.* tensor under model.language_model.language_model.*:
    # an adapter saying model.language_model.* then lands under both model.language_model. -> model. and
    # model. -> model.language_model. (ambiguous)
    "untied_ambiguous": ABase(derive="ambiguous", source="untied"),
}


@dataclass(frozen=True)
class AAdapter:
    base: str
    lora: dict = field(default_factory=dict)
    seed: int = 1
    resize: int | None = None  # model.resize_token_embeddings(resize) before get_peft_model
    train_steps: int = 0  # real SGD steps (next-token loss on input_ids()) after simulate_training
    # byte-level rewrite of a built adapter: ("rename", source adapter, old key prefix, new key prefix)
    derive: tuple | None = None


def _L(*targets, r=4, alpha=8, **kw) -> dict:
    return dict(r=r, lora_alpha=alpha, target_modules=list(targets), **kw)


AADAPTERS: dict[str, AAdapter] = {
    # plain Linear LoRA (the control for renames and refusals)
    "plain": AAdapter("untied", _L(*LINEAR), seed=101),
    # 1. embedding LoRA (with its saved base_layer copy); rsLoRA makes the scale inexact in binary
    "emb": AAdapter("untied", _L("embed_tokens", "q_proj", "v_proj"), seed=102),
    "emb_rs": AAdapter("untied_bias", _L("embed_tokens", "lm_head", *ATTN, r=3, alpha=13, use_rslora=True),
                       seed=103),
    # 2. DoRA on Linear and Embedding
    "dora": AAdapter("untied", _L(*LINEAR, "embed_tokens", r=4, alpha=8, use_dora=True), seed=104),
    "dora_bias": AAdapter("untied_bias", _L(*ATTN, r=4, alpha=13, use_rslora=True, use_dora=True), seed=105),
    # 3. modules_to_save
    "mts_head": AAdapter("untied", _L("q_proj", modules_to_save=["lm_head"]), seed=106),
    # 4. trainable tokens, list and dict form
    "tt_list": AAdapter("untied", _L("q_proj", trainable_token_indices=[3, 7, 200]), seed=107),
    "tt_dict": AAdapter("untied", _L("q_proj", trainable_token_indices={"embed_tokens": [5, 250]}), seed=108),
    # 5. biases
    "bias_all": AAdapter("untied_bias", _L("q_proj", "v_proj", bias="all"), seed=109),
    "bias_lora_only": AAdapter("untied_bias", _L("q_proj", "v_proj", bias="lora_only"), seed=110),
    "lora_bias": AAdapter("untied_bias", _L(*ATTN, lora_bias=True), seed=111),
    "lora_bias_nobias": AAdapter("untied", _L(*ATTN, lora_bias=True), seed=112),  # refused (E12)
    # 6. resized vocabulary (256 -> 260)
    "rs_q": AAdapter("untied", _L("q_proj", "v_proj"), seed=113, resize=260),
    "rs_mts": AAdapter("untied", _L("q_proj", modules_to_save=["embed_tokens", "lm_head"]), seed=114, resize=260),
    "rs_tt": AAdapter("untied", _L("q_proj", trainable_token_indices=[256, 257, 10]), seed=115, resize=260),
    "rs_emb": AAdapter("untied", _L("embed_tokens", "q_proj"), seed=116, resize=260),  # E3: lm_head not saved
    # 7. tied embeddings (spec §7 table, one adapter per row)
    "t_emb": AAdapter("tied", _L("embed_tokens", "q_proj"), seed=121),
    "t_head": AAdapter("tied", _L("lm_head", "q_proj"), seed=122),
    "t_both": AAdapter("tied", _L("embed_tokens", "lm_head"), seed=123),
    "t_both_ewt": AAdapter("tied", _L("embed_tokens", "lm_head", ensure_weight_tying=True), seed=124),
    # the same, trained for real: PEFT 0.21.2 creates lm_head's factors as *copies* of the embedding's
    # (not shared storage), so the optimizer moves them apart and the file loses the tying signature
    "t_both_ewt_trained": AAdapter("tied", _L("embed_tokens", "lm_head", ensure_weight_tying=True), seed=130,
                                   train_steps=3),
    "t_mts": AAdapter("tied", _L("q_proj", modules_to_save=["lm_head"]), seed=125),
    "t_mts_ewt": AAdapter("tied", _L("q_proj", modules_to_save=["lm_head"], ensure_weight_tying=True), seed=126),
    "t_tt": AAdapter("tied", _L("q_proj", trainable_token_indices=[3, 7, 200]), seed=127),
    "t_q": AAdapter("tied_bias", _L(*ATTN), seed=128),  # control: tied base, no embedding touched
    "t_emb_bias": AAdapter("tied_bias", _L("embed_tokens", *ATTN, bias="all"), seed=129),
    # 8. renames (byte-level rewrites of real adapters)
    "vlm_emb": AAdapter("untied", derive=("rename", "emb", PREFIX + "model.", PREFIX + "model.language_model.")),
    "vlm_mts": AAdapter("untied", derive=("rename", "mts_head", PREFIX + "model.",
                                          PREFIX + "model.language_model.")),
    "custom_emb": AAdapter("untied", derive=("rename", "emb", PREFIX + "model.", PREFIX + "backbone.")),
    # refusal sources
    "dora_plain": AAdapter("untied", _L(*LINEAR, use_dora=True), seed=131),
}


# --------------------------------------------------------------------------------------------------
# Builders


def qwen_config(spec: ABase, vocab: int = VOCAB):
    from transformers import Qwen3Config

    return Qwen3Config(
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        vocab_size=vocab,
        max_position_embeddings=64,
        tie_word_embeddings=spec.tie,
        attention_bias=spec.bias,
    )


def build_abase(spec: ABase, out: Path, sources: dict[str, Path]) -> Path:
    if spec.derive == "lm_head_stored":
        add_stored_lm_head(sources[spec.source], out)
    elif spec.derive == "vlm_keys":
        rename_base_keys(sources[spec.source], out, "model.", "model.language_model.")
    elif spec.derive == "ambiguous":
        def add_copies(shard, tensors):
            for k in list(tensors):
                if k.startswith("model."):
                    tensors["model.language_model.language_model." + k[len("model."):]] = tensors[k].clone()
            return tensors

        _rewrite_checkpoint(sources[spec.source], out, add_copies)
    else:
        from transformers import AutoModelForCausalLM

        torch.manual_seed(spec.seed)
        model = AutoModelForCausalLM.from_config(qwen_config(spec), dtype=torch.bfloat16)
        if spec.bias:  # transformers initialises biases to zero; give them values a merge must keep
            with torch.no_grad():
                g = torch.Generator().manual_seed(spec.seed)
                for name, p in model.named_parameters():
                    if name.endswith(".bias"):
                        p.copy_(0.05 * torch.randn(p.shape, generator=g))
        model.save_pretrained(out, max_shard_size="20KB")
        assert len(shard_files(out)) >= 3, shard_files(out)
    assert (out / "model.safetensors.index.json").exists()
    return out


def _rewrite_checkpoint(src: Path, out: Path, edit) -> None:
    """Copy a sharded checkpoint, passing each shard's tensor dict through edit(shard_name, tensors)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, out)
    index_path = out / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    weight_map, total = {}, 0
    for shard in shard_files(out):
        tensors = edit(shard, load_file(out / shard))
        save_file(tensors, out / shard, metadata={"format": "pt"})
        for k, v in tensors.items():
            weight_map[k] = shard
            total += v.numel() * v.element_size()
    index["weight_map"] = dict(sorted(weight_map.items()))
    index["metadata"]["total_size"] = total
    index_path.write_text(json.dumps(index, indent=2))


def add_stored_lm_head(src: Path, out: Path) -> None:
    embed = None
    for shard in shard_files(src):
        from safetensors.torch import load_file

        t = load_file(src / shard)
        if EMBED in t:
            embed = t[EMBED].clone()
    last = shard_files(src)[-1]

    def edit(shard, tensors):
        assert HEAD not in tensors
        if shard == last:
            tensors[HEAD] = embed.clone()
        return tensors

    _rewrite_checkpoint(src, out, edit)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True


def rename_base_keys(src: Path, out: Path, old: str, new: str) -> None:
    _rewrite_checkpoint(src, out, lambda shard, t: {(new + k[len(old):] if k.startswith(old) else k): v
                                                    for k, v in t.items()})


def simulate_training(peft_model, seed: int) -> None:
    """Perturb every trainable parameter as training would, so nothing equals its initial value.

    PEFT initialises DoRA magnitudes to ||W + sBA||, trainable-token rows and modules_to_save copies to
    the base values and saved biases to the base biases; embedding LoRA factors start as randn (huge for
    a 0.02-scale embedding), so they are replaced by smaller random values. Linear lora_A / lora_B keep
    PEFT's (non-zero, init_lora_weights=False) values. ensure_weight_tying's lm_head factors are
    re-derived from the embedding factors afterwards, as the tie requires.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        seen = set()
        for name, p in peft_model.named_parameters():
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            noise = torch.randn(p.shape, generator=g).to(p.dtype)
            if "lora_embedding_" in name:
                p.copy_(0.1 * noise)
            elif (".lora_A." in name or ".lora_B." in name) and name.endswith(".weight"):
                continue
            elif "lora_magnitude_vector" in name:
                p.mul_(1 + 0.2 * noise)
            elif name.endswith(".lora_B.default.bias"):
                p.copy_(0.1 * noise)
            else:  # modules_to_save copies, trainable-token rows, bias="all"/"lora_only" biases
                p.add_(0.05 * noise)
        # ensure_weight_tying: lm_head.lora_A = emb_B^T and lora_B = emb_A^T (PEFT creates them as copies)
        base = peft_model.base_model.model
        head = getattr(base, "lm_head", None)
        emb = base.get_input_embeddings()
        cfg = peft_model.peft_config["default"]
        if getattr(cfg, "ensure_weight_tying", False) and hasattr(head, "lora_A") and hasattr(emb, "lora_embedding_A"):
            head.lora_A["default"].weight.copy_(emb.lora_embedding_B["default"].t())
            head.lora_B["default"].weight.copy_(emb.lora_embedding_A["default"].t())


def build_aadapter(spec: AAdapter, base_dir: Path, out: Path) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.bfloat16)
    torch.manual_seed(spec.seed)
    if spec.resize:
        model.resize_token_embeddings(spec.resize)
    peft_model = get_peft_model(model, LoraConfig(init_lora_weights=False, **spec.lora))
    simulate_training(peft_model, spec.seed)
    if spec.train_steps:
        params = [p for p in peft_model.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=0.5)
        ids = input_ids(spec.resize or VOCAB)
        for _ in range(spec.train_steps):
            opt.zero_grad()
            peft_model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
    peft_model.save_pretrained(out)
    assert (out / "adapter_model.safetensors").exists() and (out / "adapter_config.json").exists()
    return out


def rewrite_adapter_keys(src: Path, out: Path, old: str, new: str) -> Path:
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, out)
    path = out / "adapter_model.safetensors"
    tensors = load_file(path)
    renamed = {(new + k[len(old):] if k.startswith(old) else k): v for k, v in tensors.items()}
    assert renamed.keys() != tensors.keys()
    save_file(renamed, path, metadata={"format": "pt"})
    return out


class ArtifactZoo:
    """Builds the bases / adapters above on first use, once per session."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self._bases: dict[str, Path] = {}
        self._adapters: dict[str, Path] = {}
        self._refs: dict = {}

    def base(self, name: str) -> Path:
        if name not in self._bases:
            spec = ABASES[name]
            sources = {spec.source: self.base(spec.source)} if spec.source else {}
            self._bases[name] = build_abase(spec, self.root / "bases" / name, sources)
        return self._bases[name]

    def adapter(self, name: str) -> Path:
        if name not in self._adapters:
            spec = AADAPTERS[name]
            out = self.root / "adapters" / name
            if spec.derive:
                kind, source, old, new = spec.derive
                assert kind == "rename"
                self._adapters[name] = rewrite_adapter_keys(self.adapter(source), out, old, new)
            else:
                self._adapters[name] = build_aadapter(spec, self.base(spec.base), out)
        return self._adapters[name]

    def pair(self, name: str) -> tuple[Path, Path]:
        return self.base(AADAPTERS[name].base), self.adapter(name)

    def twin(self, name: str, base_name: str | None = None) -> dict[str, torch.Tensor]:
        """PEFT merge_and_unload() of adapter `name` on an *untied twin* of its tied base."""
        base_name = base_name or AADAPTERS[name].base
        key = ("twin", name, base_name)
        if key not in self._refs:
            self._refs[key] = peft_untied_twin_state_dict(self.base(base_name), self.adapter(name))
        return self._refs[key]

    def reference(self, name: str, base_name: str | None = None) -> dict[str, torch.Tensor]:
        """PEFT merge_and_unload() state dict of adapter `name` on its base (or on `base_name`)."""
        base_name = base_name or AADAPTERS[name].base
        key = (name, base_name)
        if key not in self._refs:
            self._refs[key] = peft_merged_state_dict(self.base(base_name), self.adapter(name),
                                                     resize=AADAPTERS[name].resize)
        return self._refs[key]


_ZOO: ArtifactZoo | None = None


def artifact_zoo(tmp_path_factory) -> ArtifactZoo:
    """The session-wide ArtifactZoo (shared by every test module that asks for it)."""
    global _ZOO
    if _ZOO is None:
        torch.set_num_threads(2)
        _ZOO = ArtifactZoo(tmp_path_factory.mktemp("artifacts"))
    return _ZOO


# --------------------------------------------------------------------------------------------------
# References from the real libraries


def load_base_model(base_dir: Path, resize: int | None = None):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.bfloat16)
    if resize:
        torch.manual_seed(0)  # the new rows are overwritten by the adapter's full copies
        model.resize_token_embeddings(resize)
    return model


def peft_unmerged(base_dir: Path, adapter_dir: Path, resize: int | None = None):
    from peft import PeftModel

    return PeftModel.from_pretrained(load_base_model(base_dir, resize), adapter_dir).eval()


def peft_merged_state_dict(base_dir: Path, adapter_dir: Path, resize: int | None = None) -> dict[str, torch.Tensor]:
    """The brief's reference: PeftModel.from_pretrained(base, adapter).merge_and_unload().state_dict()."""
    merged = peft_unmerged(base_dir, adapter_dir, resize).merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def peft_untied_twin_state_dict(base_dir: Path, adapter_dir: Path) -> dict[str, torch.Tensor]:
    """PEFT's merge on the same weights with the tie cut (lm_head an independent copy of the embedding).

    In the un-merged PeftModel of a tied base each side gets only its own delta, so for the adapters
    without ensure_weight_tying / tied trainable tokens this is what a correct merge must contain,
    computed by PEFT itself (the embedding still with PEFT's double rounding)."""
    from peft import PeftModel

    model = load_base_model(base_dir)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(model.model.embed_tokens.weight.detach().clone())
    merged = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    assert merged.lm_head.weight.data_ptr() != merged.model.embed_tokens.weight.data_ptr()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def input_ids(vocab: int = VOCAB) -> torch.Tensor:
    ids = torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(4321))
    ids[0, :8] = torch.tensor([3, 7, 200, 5, 250, 10, 0, 1]) % vocab  # the trainable-token rows
    if vocab > VOCAB:
        ids[1, :4] = torch.tensor([256, 257, 258, 259])
    return ids


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits.float()


# --------------------------------------------------------------------------------------------------
# Reading the merged output (byte level, no qwen_merge code)


def out_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """name -> tensor over all shards of a merged folder (each name stored once)."""
    return {k: to_tensor(d, s, b) for k, (_, d, s, b) in checkpoint_tensors(folder).items()}


def check_index(folder: Path) -> dict:
    """The index's weight_map names exactly the stored tensors and total_size is their payload."""
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    stored = checkpoint_tensors(folder)
    assert index["weight_map"] == {k: v[0] for k, v in stored.items()}, "index weight_map != shard contents"
    total = sum(len(v[3]) for v in stored.values())
    assert index["metadata"]["total_size"] == total, (index["metadata"]["total_size"], total)
    for shard in shard_files(folder):
        n, header = read_header(folder / shard)
        spans = sorted(tuple(e["data_offsets"]) for k, e in header.items() if k != "__metadata__")
        assert spans[0][0] == 0 and all(a[1] == b[0] for a, b in zip(spans, spans[1:])), shard
        assert 8 + n + spans[-1][1] == (folder / shard).stat().st_size, f"{shard}: length != header"
    return index


def ulp_of(t: torch.Tensor) -> torch.Tensor:
    """fp32 size of one unit in the last place of each bf16 value (of max(|t|, smallest normal))."""
    a = t.float().abs().clamp_min(torch.finfo(torch.bfloat16).tiny)
    return torch.pow(2.0, torch.floor(torch.log2(a)) - 7)


def embedding_operands(adapter_dir: Path, module: str = "model.embed_tokens") -> tuple[torch.Tensor, torch.Tensor]:
    """(W, ΔW) of an embedding LoRA from the adapter file alone: W is the saved full base copy (which
    replaces the base first), ΔW = (B @ A)^T * s in fp32."""
    a = adapter_tensors(adapter_dir)
    W = a[module + ".base_layer.weight"]
    A, B = a[module + ".lora_embedding_A"].float(), a[module + ".lora_embedding_B"].float()
    return W, (B @ A).T * fl32(scale_of(adapter_dir, module))


def operand_ulps(ours: torch.Tensor, theirs: torch.Tensor, *operands: torch.Tensor) -> tuple[int, float]:
    """(elements that differ, largest |ours - theirs| in ulps of the largest of |ours|, |theirs| and the
    operands). Double rounding W + rnd(ΔW) can move a result by one ulp of the larger operand; near a
    cancellation that is many ulps of the (tiny) result, so result ulps are the wrong yardstick."""
    larger = torch.stack([ours.float().abs(), theirs.float().abs(), *(o.float().abs() for o in operands)]).amax(0)
    ratio = (ours.float() - theirs.float()).abs() / ulp_of(larger)
    return int((ours != theirs).sum()), float(ratio.max()) if ratio.numel() else 0.0


def ulp_count(ours: torch.Tensor, theirs: torch.Tensor) -> tuple[int, int]:
    """(number of elements that differ, largest difference in ulp)."""
    u = ulp_distance(ours.contiguous(), theirs.contiguous())
    return int((u > 0).sum()), int(u.max()) if u.numel() else 0



# --------------------------------------------------------------------------------------------------
# Expectations derived from the adapter file alone (spec §1.3 key table; no qwen_merge code)


def adapter_tensors(adapter_dir: Path) -> dict[str, torch.Tensor]:
    """Adapter tensors keyed without the base_model.model. prefix."""
    from safetensors.torch import load_file

    raw = load_file(Path(adapter_dir) / "adapter_model.safetensors")
    return {k[len(PREFIX):] if k.startswith(PREFIX) else k: v for k, v in raw.items()}


def expected_ops(adapter_dir: Path) -> dict[str, str]:
    """base tensor -> how the adapter changes it: linear, embedding, dora, replace, rows, bias_add.

    Full base copies (`*.base_layer.weight`) only *start* a tensor (its op is its delta's); the
    redundant `original_module` / `modules_to_save` copies are ignored (spec §1.3).
    """
    ops: dict[str, str] = {}
    starts: set[str] = set()  # tensors whose saved full copy replaces the base first
    for key in adapter_tensors(adapter_dir):
        def mod(suffix):
            return key[: -len(suffix)]

        if key.endswith(".lora_A.weight"):
            name = mod(".lora_A.weight") + ".weight"
            ops[name] = "dora" if ops.get(name) == "dora" else "linear"
        elif key.endswith(".lora_embedding_A"):
            name = mod(".lora_embedding_A") + ".weight"
            ops[name] = "dora" if ops.get(name) == "dora" else "embedding"
        elif key.endswith(".lora_magnitude_vector"):
            ops[mod(".lora_magnitude_vector") + ".weight"] = "dora"
        elif key.endswith(".lora_B.bias"):
            ops[mod(".lora_B.bias") + ".bias"] = "bias_add"
        elif key.endswith(".token_adapter.trainable_tokens_delta"):
            ops[mod(".token_adapter.trainable_tokens_delta") + ".weight"] = "rows"
        elif key.endswith(".token_adapter.base_layer.weight"):
            starts.add(mod(".token_adapter.base_layer.weight") + ".weight")
        elif key.endswith(".base_layer.bias"):
            ops[mod(".base_layer.bias") + ".bias"] = "replace"
        elif key.endswith(".base_layer.weight"):
            starts.add(mod(".base_layer.weight") + ".weight")
        elif key.endswith((".lora_B.weight", ".lora_embedding_B")) or ".original_module." in key \
                or ".modules_to_save." in key:
            continue
        else:  # <N>.weight / <N>.bias: modules_to_save, bias="all", resized vocabulary
            ops[key] = "replace"
    for name in starts:  # the delta (if any) decides the op of a tensor whose base copy was saved
        ops.setdefault(name, "replace")
    return ops


def scale_of(adapter_dir: Path, module: str) -> float:
    """alpha/r (or alpha/sqrt(r)) for `module`, with PEFT's own get_pattern_key."""
    from fixtures_models import expected_rank_alpha_scale

    return expected_rank_alpha_scale(adapter_dir, module)[2]


def fl32(x: float) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float32)


# --------------------------------------------------------------------------------------------------
# Merging through qwen_merge, cached per session (outputs are read-only)


@dataclass
class Merged:
    out: Path
    report: object
    base: Path
    adapter: Path


_MERGED: dict = {}


def merged(zoo: ArtifactZoo, tmp_path_factory, adapter: str, base: str | None = None, **kwargs) -> Merged:
    """merge_shards(base, adapter, out, progress=False, **kwargs), once per argument set.

    Also checks that neither input changed and nothing but the destination appeared beside it."""
    from fixtures_models import tree_hash
    from qwen_merge import merge_shards

    base_name = base or AADAPTERS[adapter].base
    key = (adapter, base_name, repr(sorted(kwargs.items())))
    if key not in _MERGED:
        b, a = zoo.base(base_name), zoo.adapter(adapter)
        before = (tree_hash(b), tree_hash(a))
        parent = tmp_path_factory.mktemp("merged")
        out = parent / adapter
        report = merge_shards(b, a, out, progress=False, **kwargs)
        assert (tree_hash(b), tree_hash(a)) == before, "an input folder changed"
        assert sorted(p.name for p in parent.iterdir()) == [adapter], "leftovers beside the destination"
        _MERGED[key] = Merged(out, report, b, a)
    return _MERGED[key]


def run_cli(*args, cwd: Path, timeout: float = 300):
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parent.parent
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(repo), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("HF_HUB_OFFLINE", "1")
    return subprocess.run([sys.executable, "-m", "qwen_merge", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


# --------------------------------------------------------------------------------------------------
# ulp statistics, printed at the end of each module that collects them

ULP_STATS: dict[str, tuple[int, int, int]] = {}


def record(case: str, n_diff: int, n_total: int, max_ulp: int) -> None:
    old = ULP_STATS.get(case, (0, 0, 0))
    ULP_STATS[case] = (old[0] + n_diff, old[1] + n_total, max(old[2], max_ulp))


def write_stats(request, title: str, prefix: str = "") -> None:
    from contextlib import nullcontext

    tr = request.config.pluginmanager.get_plugin("terminalreporter")
    capman = request.config.pluginmanager.get_plugin("capturemanager")
    rows = {k: v for k, v in ULP_STATS.items() if k.startswith(prefix)}
    if tr is None or not rows:
        return
    with capman.global_and_fixture_disabled() if capman else nullcontext():
        tr.write_line("")
        tr.write_line(f"--- {title} ---")
        for case, (n_diff, n, worst) in sorted(rows.items()):
            worst = f"{worst:.2f}" if isinstance(worst, float) else str(worst)
            tr.write_line(f"{case:>72}: {n_diff:6d} / {n:7d} differ ({n_diff / max(n, 1):7.3%}), max {worst} ulp")
