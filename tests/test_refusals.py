"""Adapters qwen_merge must refuse, as one table: (input builder, expected error class, expected message
fragments). Every case must raise exactly one of its error classes, through merge_shards and plan_merge
alike, with a one-line message that names the offending key / field / index (and the hints the issues ask
for), and write nothing: no destination, no temp folder beside it, inputs unchanged, no pickle executed.

Each input starts as a real PEFT adapter, edited with safetensors / json where a case needs it: table 1's
"basic" (builders.ADAPTERS, on qwen_bf16), table 2's adapters (builders.AADAPTERS, built with
init_lora_weights=False, so their config says so) and a real LoHa adapter.
Also here: the cases that must *merge* (the unedited source; allow_pickle with a tensor-only .bin; missing
modules with the default init, where PEFT's delta is zero), so each refusal is known to come from its edit.
"""

from __future__ import annotations

import json
import pathlib
import pickle
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from builders import (AADAPTERS, ADAPTER_CFG, ADAPTER_ST, ADAPTERS, PREFIX, adapter_tensors, checkpoint_tensors,
                      copy_tree, disk_tensors, edit_json, edit_tensors, fl32, peft_merged_state_dict, run_cli,
                      tree_hash, ulp_distance)
from safetensors.torch import load_file

from qwen_merge import AdapterError, FormatError, MismatchError, QwenMergeError, merge_shards, plan_merge

L0Q = "model.layers.0.self_attn.q_proj"
SENTINEL = "PICKLE_WAS_LOADED"
INIT_HINT = "path_initial_model_for_weight_conversion"


def _randn(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(99))


class _Touch:
    """Unpickling this creates a file: proof that a pickle payload was executed."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def __reduce__(self):
        return (pathlib.Path.touch, (self.path,))


@dataclass
class Sources:
    zoo: object  # builders.Zoo (table 1)
    arts: object  # builders.ArtifactZoo (table 2)


@pytest.fixture
def sources(zoo, arts) -> Sources:
    return Sources(zoo, arts)


# --------------------------------------------------------------------------------------------------
# Input builders: (sources, adapter destination) -> (base, adapter)


@dataclass
class Edit:
    """A copy of a real adapter, edited. Tensor keys and module names are in-model (without base_model.model.)."""

    source: str = "plain"
    table: str = "arts"  # "zoo": builders.ADAPTERS (table 1); "arts": builders.AADAPTERS (table 2)
    config: dict = field(default_factory=dict)  # adapter_config.json fields to set
    rename: dict = field(default_factory=dict)  # module -> new module name (every tensor of it)
    replace: dict = field(default_factory=dict)  # key -> tensor (the key must exist)
    drop_modules: tuple = ()  # delete every tensor of these modules
    drop_keys: tuple = ()
    add: dict = field(default_factory=dict)  # key -> tensor (the key must be new)
    # adapter_model.bin instead of the safetensors file: "pickle": a raw pickle of the tensors and a pickled
    # object; "tensors": torch.save of the tensors; "payload": torch.save of the tensors and a pickled object
    bin: str | None = None
    drop_files: tuple = ()
    base: str | None = None

    def __call__(self, src: Sources, dst: Path) -> tuple[Path, Path]:
        zoo = src.zoo if self.table == "zoo" else src.arts
        table = ADAPTERS if self.table == "zoo" else AADAPTERS
        copy_tree(zoo.adapter(self.source), dst)
        if self.config:
            edit_json(dst / ADAPTER_CFG, self.config)
        st = dst / ADAPTER_ST
        if self.rename or self.replace or self.drop_modules or self.drop_keys or self.add:
            edit_tensors(st, self._edit_tensors)
        if self.bin:
            state = dict(load_file(st))
            if self.bin in ("pickle", "payload"):
                state["__sentinel__"] = _Touch(dst.parent / SENTINEL)
            if self.bin == "pickle":
                (dst / "adapter_model.bin").write_bytes(pickle.dumps(state))
            else:
                torch.save(state, dst / "adapter_model.bin")
            st.unlink()
        for name in self.drop_files:
            (dst / name).unlink()
        return zoo.base(self.base or table[self.source].base), dst

    def _edit_tensors(self, tensors: dict) -> None:
        for old, new in self.rename.items():
            for key in [k for k in tensors if k.startswith(PREFIX + old + ".")]:
                tensors[PREFIX + new + key[len(PREFIX + old):]] = tensors.pop(key)
        for key, value in self.replace.items():
            assert PREFIX + key in tensors, key
            tensors[PREFIX + key] = value
        for m in self.drop_modules:
            gone = [k for k in tensors if k.startswith(PREFIX + m + ".")]
            assert gone, m
            for k in gone:
                del tensors[k]
        for k in self.drop_keys:
            del tensors[PREFIX + k]
        for k, v in self.add.items():
            assert PREFIX + k not in tensors, k
            tensors[PREFIX + k] = v


def real_loha(src: Sources, dst: Path) -> tuple[Path, Path]:
    """A real LoHa adapter (peft_type LOHA) on table 2's untied base."""
    from peft import LoHaConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = src.arts.base("untied")
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    torch.manual_seed(0)
    get_peft_model(model, LoHaConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"], init_weights=False)
                   ).save_pretrained(dst)
    assert json.loads((dst / ADAPTER_CFG).read_text())["peft_type"] == "LOHA"
    assert any("hada_w1_a" in k for k in load_file(dst / ADAPTER_ST))
    return base, dst


def basic(**edits) -> Edit:
    """An edit of table 1's "basic" adapter (Qwen3, hidden 64, 4 layers, r=8 on every projection)."""
    return Edit(source="basic", table="zoo", **edits)


# --------------------------------------------------------------------------------------------------
# The table


@dataclass
class Case:
    id: str
    build: Callable[[Sources, Path], tuple[Path, Path]]
    exc: tuple  # the error must be exactly one of these classes
    needles: list  # the message must contain every string of at least one tuple
    kwargs: dict = field(default_factory=dict)


TT = (AdapterError, MismatchError)
CASES = [
    # peft types other than LORA
    Case("peft_type_loha", basic(config={"peft_type": "LOHA"}), (AdapterError,), [("peft_type",), ("LOHA",)]),
    Case("peft_type_ia3", basic(config={"peft_type": "IA3"}), (AdapterError,), [("peft_type",), ("IA3",)]),
    Case("peft_type_lokr", Edit(config={"peft_type": "LOKR"}), (AdapterError,), [("LOKR",), ("peft_type",)]),
    Case("loha_real", real_loha, (AdapterError,), [("LOHA",), ("peft_type",)]),
    # LoRA variants whose weights are not what the file says without their training-time state
    *[Case(f"init_{init}", Edit(config={"init_lora_weights": init}), (AdapterError,),
           [("init_lora_weights", init, INIT_HINT)])
      for init in ("pissa", "pissa_niter_4", "olora", "corda", "lora_ga", "loftq")],
    Case("use_qalora", Edit(config={"use_qalora": True, "qalora_group_size": 16}), (AdapterError,),
         [("use_qalora",), ("QALoRA",)]),
    Case("alora", Edit(config={"alora_invocation_tokens": [5, 6]}), (AdapterError,),
         [("alora_invocation_tokens",), ("aLoRA",)]),
    Case("arrow", Edit(config={"arrow_config": {"top_k": 2}}), (AdapterError,), [("arrow_config",), ("Arrow",)]),
    Case("layer_replication", Edit(config={"layer_replication": [[0, 2], [1, 2]]}), (AdapterError,),
         [("layer_replication",)]),
    # files: pickles are never loaded unasked, and a missing config is named
    Case("bin_only_raw_pickle", basic(bin="pickle"), (AdapterError,),
         [("adapter_model.bin",), ("adapter_model.safetensors",)]),
    Case("bin_only_torch_save", Edit(bin="tensors"), (AdapterError,),
         [("adapter_model.bin", "allow_pickle"), ("adapter_model.bin", "--allow-pickle")]),
    Case("bin_payload_allowed", Edit(bin="payload"), (AdapterError, FormatError), [("adapter_model.bin",)],
         kwargs={"allow_pickle": True}),
    Case("missing_config", basic(drop_files=(ADAPTER_CFG,)), (AdapterError,), [(ADAPTER_CFG,)]),
    # names and shapes that do not fit the base
    Case("unknown_module", basic(rename={L0Q: "model.layers.0.self_attn.qq_proj"}), (MismatchError,),
         [("model.layers.0.self_attn.qq_proj", "model.layers.0.self_attn.q_proj")]),
    Case("unknown_layer", basic(rename={"model.layers.3.mlp.up_proj": "model.layers.9.mlp.up_proj"}),
         (MismatchError,), [("model.layers.9.mlp.up_proj",)]),
    Case("shape_in_features", basic(replace={L0Q + ".lora_A.weight": _randn(8, 32)}), (MismatchError,),
         [("model.layers.0.self_attn.q_proj",)]),
    Case("shape_out_features", basic(replace={"model.layers.1.self_attn.k_proj.lora_B.weight": _randn(64, 8)}),
         (MismatchError,), [("model.layers.1.self_attn.k_proj",)]),
    Case("rank_a_b_disagree", basic(replace={"model.layers.2.mlp.down_proj.lora_B.weight": _randn(64, 4)}),
         (MismatchError,), [("model.layers.2.mlp.down_proj",)]),
    Case("rank_vs_rank_pattern", basic(config={"rank_pattern": {"^model.layers.3.mlp.up_proj": 4}}),
         (MismatchError,), [("model.layers.3.mlp.up_proj",)]),
    Case("rank_vs_config_r", basic(config={"r": 16}), (MismatchError,), [("_proj",)]),
    # modules the config targets but the file lacks: PEFT would inject random (init false) or
    # magnitude-only (DoRA) modules there
    Case("missing_module_init_false", Edit(drop_modules=("model.layers.1.mlp.up_proj",)), (AdapterError,),
         [("model.layers.1.mlp.up_proj",)]),
    Case("missing_module_dora", Edit(source="dora_plain", config={"init_lora_weights": True},
                                     drop_modules=("model.layers.0.self_attn.k_proj",)), (AdapterError,),
         [("model.layers.0.self_attn.k_proj",)]),
    # E17: DoRA without its magnitude
    Case("dora_flag_without_magnitudes", Edit(config={"use_dora": True}), (AdapterError,),
         [("lora_magnitude_vector",), ("use_dora",), ("DoRA",)]),
    Case("dora_missing_one_magnitude", Edit(source="dora_plain", config={"init_lora_weights": True},
                                            drop_keys=("model.layers.1.self_attn.o_proj.lora_magnitude_vector",)),
         (AdapterError,), [("model.layers.1.self_attn.o_proj",)]),
    # E12: lora_bias on a base without biases
    Case("lora_bias_without_base_bias", Edit(source="lora_bias_nobias"), (MismatchError,), [("self_attn", "bias")]),
    # trainable tokens: bad indices in the config
    Case("tt_duplicate_index", Edit(source="tt_list", config={"trainable_token_indices": [11, 7, 11]}), TT,
         [("trainable_token", "11"), ("trainable token", "11")]),
    Case("tt_index_out_of_range", Edit(source="tt_list", config={"trainable_token_indices": [3, 7, 999]}), TT,
         [("trainable_token", "999"), ("trainable token", "999")]),
    Case("tt_dict_index_out_of_range",
         Edit(source="tt_dict", config={"trainable_token_indices": {"embed_tokens": [5, 999]}}), TT,
         [("trainable_token", "999"), ("trainable token", "999")]),
    Case("tt_index_count", Edit(source="tt_list", config={"trainable_token_indices": [3, 7]}), TT,
         [("trainable_tokens_delta",), ("trainable_token_indices",)]),
    # E3: resized vocabulary with LoRA on embed_tokens: PEFT does not save the resized lm_head
    Case("resized_embedding_lora_without_lm_head", Edit(source="rs_emb"), TT, [("lm_head",)]),
    # replacement tensors that land nowhere
    Case("bias_all_without_base_bias",
         Edit(config={"bias": "all"},
              add={"model.layers.0.input_layernorm.bias": torch.zeros(32, dtype=torch.bfloat16)}),
         (MismatchError,), [("model.layers.0.input_layernorm.bias",)]),
    Case("modules_to_save_unknown_module",
         Edit(config={"modules_to_save": ["score"]}, add={"score.weight": torch.zeros(2, 32, dtype=torch.bfloat16)}),
         (MismatchError,), [("score.weight",)]),
]
assert len({c.id for c in CASES}) == len(CASES)


def _check_message(exc: BaseException, needles) -> None:
    msg = str(exc)
    assert msg.strip(), "empty error message"
    assert "\n" not in msg.strip(), f"message is not a single line: {msg!r}"
    bare = re.sub(r"\S*/\S*", "<path>", msg)  # numbers inside tmp paths do not count as naming an index

    def names(n: str) -> bool:
        return re.search(rf"\b{n}\b", bare) is not None if n.isdigit() else n in msg

    assert any(all(names(n) for n in needle) for needle in needles), f"message does not name {needles}: {msg!r}"


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_refused(sources, tmp_path, case):
    base, adapter = case.build(sources, tmp_path / "adapter")
    parent = tmp_path / "dest_parent"
    parent.mkdir()
    dest = parent / "out"
    before = (tree_hash(base), tree_hash(adapter))

    with pytest.raises(QwenMergeError) as info:
        merge_shards(base, adapter, dest, progress=False, **case.kwargs)
    assert type(info.value) in case.exc, f"{type(info.value).__name__}: {info.value}"
    _check_message(info.value, case.needles)
    assert not dest.exists() and not dest.is_symlink(), "destination was created"
    assert list(parent.iterdir()) == [], f"leftovers beside the destination: {list(parent.iterdir())}"
    assert (tree_hash(base), tree_hash(adapter)) == before, "an input was modified"
    assert not (tmp_path / SENTINEL).exists(), "a pickle payload was executed"

    with pytest.raises(QwenMergeError) as info_plan:
        plan_merge(base, adapter, **case.kwargs)
    assert type(info_plan.value) in case.exc, f"plan_merge: {type(info_plan.value).__name__}: {info_plan.value}"
    _check_message(info_plan.value, case.needles)
    assert not (tmp_path / SENTINEL).exists(), "a pickle payload was executed"


def test_refused_on_the_command_line(sources, tmp_path):
    """One refusal through the CLI: exit 1, a single 'error: ' line, nothing written."""
    base, adapter = Edit(config={"init_lora_weights": "olora"})(sources, tmp_path / "adapter")
    proc = run_cli("merge", base, adapter, tmp_path / "out", "--quiet", cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and INIT_HINT in lines[0], proc.stderr
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------
# Guards, and what must merge


@pytest.mark.parametrize("loader", ["pickle", "torch_load"])
def test_pickle_sentinel_works(tmp_path, loader):
    """Guard for the pickle cases: unpickling our .bin (raw pickle, or torch.load without weights_only)
    really would leave a trace."""
    if loader == "pickle":
        pickle.loads(pickle.dumps({"x": _Touch(tmp_path / "touched")}))
    else:
        torch.save({"x": _Touch(tmp_path / "touched")}, tmp_path / "p.bin")
        torch.load(tmp_path / "p.bin", weights_only=False)
    assert (tmp_path / "touched").exists()


def test_edited_adapters_are_otherwise_loadable(sources, tmp_path):
    """Guard: table 1's starting adapter merges fine, so every refusal of an edit of it is caused by its edit."""
    base, adapter = basic()(sources, tmp_path / "adapter")
    report = merge_shards(base, adapter, tmp_path / "out", progress=False)
    assert report.merged == 4 * 7


def test_bin_merges_with_allow_pickle(sources, tmp_path):
    base, adapter = Edit(source="emb", bin="tensors")(sources, tmp_path / "adapter")
    assert not (adapter / ADAPTER_ST).exists()
    plan_merge(base, adapter, allow_pickle=True)
    merge_shards(base, adapter, tmp_path / "out", progress=False, allow_pickle=True)
    assert checkpoint_tensors(tmp_path / "out") == checkpoint_tensors(sources.arts.merged("emb").out)
    proc = run_cli("merge", base, adapter, tmp_path / "out_cli", "--allow-pickle", "--quiet", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert checkpoint_tensors(tmp_path / "out_cli") == checkpoint_tensors(tmp_path / "out")


def test_missing_module_with_default_init_merges_like_peft(sources, tmp_path):
    """init_lora_weights=true: PEFT injects B = 0 for a module without tensors, so the merge is the
    same without it; the merge must go through and match PEFT."""
    base, adapter = Edit(config={"init_lora_weights": True},
                         drop_modules=("model.layers.1.mlp.up_proj",))(sources, tmp_path / "adapter")
    merge_shards(base, adapter, tmp_path / "out", progress=False)
    ours = disk_tensors(tmp_path / "out")
    ref = peft_merged_state_dict(base, adapter)
    base_t = disk_tensors(base)
    assert torch.equal(ours["model.layers.1.mlp.up_proj.weight"], base_t["model.layers.1.mlp.up_proj.weight"])
    for name, t in ours.items():
        u = ulp_distance(t, ref[name])
        assert int(u.max()) <= 1 and int((u > 0).sum()) <= 1e-3 * t.numel() + 1, name


def test_dora_zero_norm_row_is_an_error(sources, tmp_path):
    """W[13] + ΔW[13] == 0 exactly for layer 0's q_proj: DoRA divides by that row's norm. PEFT's
    unsafe merge writes NaN there; we must refuse, naming the tensor and the row, and write nothing."""
    arts = sources.arts
    module, row = L0Q, 13
    W = disk_tensors(arts.base("untied"))[module + ".weight"].float()
    src = adapter_tensors(arts.adapter("dora_plain"))
    cfg = json.loads((arts.adapter("dora_plain") / ADAPTER_CFG).read_text())
    s = cfg["lora_alpha"] / cfg["r"]
    assert s == 2.0
    A, B = src[module + ".lora_A.weight"].clone(), src[module + ".lora_B.weight"].clone()
    A[0] = W[row]  # exact: bf16 values in fp32
    B[row] = 0.0
    B[row, 0] = -1.0 / s  # ΔW[row] = s * (-1/s) * W[row] = -W[row], exactly
    assert torch.equal(W[row] + (B @ A)[row] * fl32(s), torch.zeros(W.shape[1])), "fixture error: norm is not 0"
    base, adapter = Edit(source="dora_plain", replace={module + ".lora_A.weight": A,
                                                       module + ".lora_B.weight": B})(sources, tmp_path / "adapter")
    # PEFT: NaN in that row (the crafted adapter is what the test says it is)
    ref = peft_merged_state_dict(base, adapter)[module + ".weight"]
    assert torch.isnan(ref[row]).all() and not torch.isnan(ref[row + 1]).any()

    plan_merge(base, adapter)  # headers only: the norm is not known yet
    parent = tmp_path / "parent"
    parent.mkdir()
    before = tree_hash(adapter)
    with pytest.raises(MismatchError) as info:
        merge_shards(base, adapter, parent / "out", progress=False)
    msg = str(info.value)
    assert "\n" not in msg.strip(), msg
    assert module in msg, msg
    assert re.search(rf"\b{row}\b", re.sub(r"\S*/\S*", "<path>", msg)), f"row {row} not named: {msg}"
    assert list(parent.iterdir()) == [], "something was written"
    assert tree_hash(adapter) == before
