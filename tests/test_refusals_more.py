"""Issue 3 refusals: each with the right error class, a one-line message that names the offending
key / field / index (and the hints the issue asks for), and nothing written: no destination, no temp
folder beside it, inputs unchanged, no pickle executed.

Sources are real PEFT adapters from fixtures_artifacts (built with init_lora_weights=False, so their
config says so) and a real LoHa adapter, edited with safetensors / json where a case needs it.
Also here: the cases that must *merge* (allow_pickle with a tensor-only .bin; missing modules with
the default init, where PEFT's delta is zero), so each refusal is known to come from its edit.
"""

from __future__ import annotations

import json
import pathlib
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fixtures_artifacts import AADAPTERS, PREFIX, adapter_tensors, artifact_zoo, fl32, merged, out_tensors, run_cli
from fixtures_models import checkpoint_tensors, tree_hash, ulp_distance
from qwen_merge import AdapterError, FormatError, MismatchError, QwenMergeError, merge_shards, plan_merge


@pytest.fixture(scope="module")
def arts(tmp_path_factory):
    return artifact_zoo(tmp_path_factory)


class _Touch:
    """Unpickling this creates a file: proof that a pickle payload was executed."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def __reduce__(self):
        return (pathlib.Path.touch, (self.path,))


@dataclass
class Case:
    id: str
    source: str = "plain"
    config: dict = field(default_factory=dict)
    drop_modules: tuple = ()  # delete every tensor of these modules (in-model names)
    drop_keys: tuple = ()
    add: dict = field(default_factory=dict)  # key (without prefix) -> tensor
    bin: str | None = None  # "tensors": torch.save of the real state dict; "payload": plus a pickled object
    exc: tuple = (AdapterError,)
    needles: list = field(default_factory=list)  # the message must contain every string of one tuple
    kwargs: dict = field(default_factory=dict)
    base: str | None = None

    def build(self, arts, dst: Path) -> Path:
        if self.source == "loha":
            return _build_loha(arts, dst)
        shutil.copytree(arts.adapter(self.source), dst)
        cfg_path = dst / "adapter_config.json"
        if self.config:
            cfg = json.loads(cfg_path.read_text())
            cfg.update(self.config)
            cfg_path.write_text(json.dumps(cfg, indent=2))
        st = dst / "adapter_model.safetensors"
        tensors = load_file(st)
        if self.drop_modules or self.drop_keys or self.add:
            for m in self.drop_modules:
                gone = [k for k in tensors if k.startswith(PREFIX + m + ".")]
                assert gone, m
                for k in gone:
                    del tensors[k]
            for k in self.drop_keys:
                del tensors[PREFIX + k]
            for k, v in self.add.items():
                assert PREFIX + k not in tensors
                tensors[PREFIX + k] = v
            save_file(tensors, st, metadata={"format": "pt"})
        if self.bin:
            state = dict(tensors)
            if self.bin == "payload":
                state["__sentinel__"] = _Touch(dst.parent / "PICKLE_WAS_LOADED")
            torch.save(state, dst / "adapter_model.bin")
            st.unlink()
        return dst


def _build_loha(arts, dst: Path) -> Path:
    """A real LoHa adapter (peft_type LOHA) on the untied base."""
    from peft import LoHaConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(arts.base("untied"), dtype=torch.bfloat16)
    torch.manual_seed(0)
    get_peft_model(model, LoHaConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"], init_weights=False)
                   ).save_pretrained(dst)
    assert json.loads((dst / "adapter_config.json").read_text())["peft_type"] == "LOHA"
    assert any("hada_w1_a" in k for k in load_file(dst / "adapter_model.safetensors"))
    return dst


INIT_HINT = "path_initial_model_for_weight_conversion"
CASES = [
    Case("loha_real", source="loha", needles=[("LOHA",), ("peft_type",)]),
    Case("peft_type_lokr", config={"peft_type": "LOKR"}, needles=[("LOKR",), ("peft_type",)]),
    *[
        Case(f"init_{init}", config={"init_lora_weights": init}, needles=[("init_lora_weights", init, INIT_HINT)])
        for init in ("pissa", "pissa_niter_4", "olora", "corda", "lora_ga", "loftq")
    ],
    Case("use_qalora", config={"use_qalora": True, "qalora_group_size": 16}, needles=[("use_qalora",), ("QALoRA",)]),
    Case("alora", config={"alora_invocation_tokens": [5, 6]}, needles=[("alora_invocation_tokens",), ("aLoRA",)]),
    Case("arrow", config={"arrow_config": {"top_k": 2}}, needles=[("arrow_config",), ("Arrow",)]),
    Case("layer_replication", config={"layer_replication": [[0, 2], [1, 2]]}, needles=[("layer_replication",)]),
    Case("bin_only", bin="tensors", needles=[("adapter_model.bin", "allow_pickle"), ("adapter_model.bin", "--allow-pickle")]),
    Case("bin_payload_allowed", bin="payload", kwargs={"allow_pickle": True}, exc=(AdapterError, FormatError),
         needles=[("adapter_model.bin",)]),
    # modules the config targets but the file lacks: PEFT would inject random (init false) or
    # magnitude-only (DoRA) modules there
    Case("missing_module_init_false", drop_modules=("model.layers.1.mlp.up_proj",),
         needles=[("model.layers.1.mlp.up_proj",)]),
    Case("missing_module_dora", source="dora_plain", config={"init_lora_weights": True},
         drop_modules=("model.layers.0.self_attn.k_proj",), needles=[("model.layers.0.self_attn.k_proj",)]),
    # E17: DoRA without its magnitude
    Case("dora_flag_without_magnitudes", config={"use_dora": True},
         needles=[("lora_magnitude_vector",), ("use_dora",), ("DoRA",)]),
    Case("dora_missing_one_magnitude", source="dora_plain", config={"init_lora_weights": True},
         drop_keys=("model.layers.1.self_attn.o_proj.lora_magnitude_vector",),
         needles=[("model.layers.1.self_attn.o_proj",)]),
    # E12: lora_bias on a base without biases
    Case("lora_bias_without_base_bias", source="lora_bias_nobias", exc=(MismatchError,),
         needles=[("self_attn", "bias")]),
    # trainable tokens: bad indices in the config
    Case("tt_duplicate_index", source="tt_list", config={"trainable_token_indices": [11, 7, 11]},
         exc=(AdapterError, MismatchError), needles=[("trainable_token", "11"), ("trainable token", "11")]),
    Case("tt_index_out_of_range", source="tt_list", config={"trainable_token_indices": [3, 7, 999]},
         exc=(AdapterError, MismatchError), needles=[("trainable_token", "999"), ("trainable token", "999")]),
    Case("tt_dict_index_out_of_range", source="tt_dict", config={"trainable_token_indices": {"embed_tokens": [5, 999]}},
         exc=(AdapterError, MismatchError), needles=[("trainable_token", "999"), ("trainable token", "999")]),
    Case("tt_index_count", source="tt_list", config={"trainable_token_indices": [3, 7]},
         exc=(AdapterError, MismatchError), needles=[("trainable_tokens_delta",), ("trainable_token_indices",)]),
    # E3: resized vocabulary with LoRA on embed_tokens: PEFT does not save the resized lm_head
    Case("resized_embedding_lora_without_lm_head", source="rs_emb", exc=(AdapterError, MismatchError),
         needles=[("lm_head",)]),
    # replacement tensors that land nowhere
    Case("bias_all_without_base_bias", config={"bias": "all"},
         add={"model.layers.0.input_layernorm.bias": torch.zeros(32, dtype=torch.bfloat16)},
         exc=(MismatchError,), needles=[("model.layers.0.input_layernorm.bias",)]),
    Case("modules_to_save_unknown_module", config={"modules_to_save": ["score"]},
         add={"score.weight": torch.zeros(2, 32, dtype=torch.bfloat16)}, exc=(MismatchError,),
         needles=[("score.weight",)]),
]


def _check_message(exc: BaseException, needles) -> None:
    msg = str(exc)
    assert msg.strip(), "empty error message"
    assert "\n" not in msg.strip(), f"message is not a single line: {msg!r}"
    bare = re.sub(r"\S*/\S*", "<path>", msg)  # numbers inside tmp paths do not count as naming an index

    def names(n: str) -> bool:
        return re.search(rf"\b{n}\b", bare) is not None if n.isdigit() else n in msg

    assert any(all(names(n) for n in needle) for needle in needles), f"message does not name {needles}: {msg!r}"


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_refused(arts, tmp_path, case):
    base = arts.base(case.base or ("untied" if case.source == "loha" else AADAPTERS[case.source].base))
    adapter = case.build(arts, tmp_path / "adapter")
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
    assert not (tmp_path / "PICKLE_WAS_LOADED").exists(), "a pickle payload was executed"

    with pytest.raises(QwenMergeError) as info_plan:
        plan_merge(base, adapter, **case.kwargs)
    assert type(info_plan.value) in case.exc, f"plan_merge: {type(info_plan.value).__name__}: {info_plan.value}"
    _check_message(info_plan.value, case.needles)
    assert not (tmp_path / "PICKLE_WAS_LOADED").exists(), "a pickle payload was executed"


def test_refused_on_the_command_line(arts, tmp_path):
    """One refusal through the CLI: exit 1, a single 'error: ' line, nothing written."""
    adapter = Case("x", config={"init_lora_weights": "olora"}).build(arts, tmp_path / "adapter")
    proc = run_cli("merge", arts.base("untied"), adapter, tmp_path / "out", "--quiet", cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and INIT_HINT in lines[0], proc.stderr
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------
# What must merge


def test_pickle_sentinel_works(tmp_path):
    """Guard for the payload case: loading the .bin without weights_only really leaves a trace."""
    torch.save({"x": _Touch(tmp_path / "touched")}, tmp_path / "p.bin")
    torch.load(tmp_path / "p.bin", weights_only=False)
    assert (tmp_path / "touched").exists()


def test_bin_merges_with_allow_pickle(arts, tmp_path_factory, tmp_path):
    adapter = Case("bin", source="emb", bin="tensors").build(arts, tmp_path / "adapter")
    assert not (adapter / "adapter_model.safetensors").exists()
    base = arts.base("untied")
    plan_merge(base, adapter, allow_pickle=True)
    merge_shards(base, adapter, tmp_path / "out", progress=False, allow_pickle=True)
    assert checkpoint_tensors(tmp_path / "out") == checkpoint_tensors(merged(arts, tmp_path_factory, "emb").out)
    proc = run_cli("merge", base, adapter, tmp_path / "out_cli", "--allow-pickle", "--quiet", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert checkpoint_tensors(tmp_path / "out_cli") == checkpoint_tensors(tmp_path / "out")


def test_missing_module_with_default_init_merges_like_peft(arts, tmp_path):
    """init_lora_weights=true: PEFT injects B = 0 for a module without tensors, so the merge is the
    same without it; the merge must go through and match PEFT."""
    from fixtures_artifacts import peft_merged_state_dict

    adapter = Case("x", config={"init_lora_weights": True},
                   drop_modules=("model.layers.1.mlp.up_proj",)).build(arts, tmp_path / "adapter")
    base = arts.base("untied")
    merge_shards(base, adapter, tmp_path / "out", progress=False)
    ours = out_tensors(tmp_path / "out")
    ref = peft_merged_state_dict(base, adapter)
    base_t = out_tensors(base)
    assert torch.equal(ours["model.layers.1.mlp.up_proj.weight"], base_t["model.layers.1.mlp.up_proj.weight"])
    for name, t in ours.items():
        u = ulp_distance(t, ref[name])
        assert int(u.max()) <= 1 and int((u > 0).sum()) <= 1e-3 * t.numel() + 1, name


def test_dora_zero_norm_row_is_an_error(arts, tmp_path):
    """W[13] + ΔW[13] == 0 exactly for layer 0's q_proj: DoRA divides by that row's norm. PEFT's
    unsafe merge writes NaN there; we must refuse, naming the tensor and the row, and write nothing."""
    from fixtures_artifacts import peft_merged_state_dict

    module, row = "model.layers.0.self_attn.q_proj", 13
    base = arts.base("untied")
    W = out_tensors(base)[module + ".weight"].float()
    src = adapter_tensors(arts.adapter("dora_plain"))
    cfg = json.loads((arts.adapter("dora_plain") / "adapter_config.json").read_text())
    s = cfg["lora_alpha"] / cfg["r"]
    assert s == 2.0
    A, B = src[module + ".lora_A.weight"].clone(), src[module + ".lora_B.weight"].clone()
    A[0] = W[row]  # exact: bf16 values in fp32
    B[row] = 0.0
    B[row, 0] = -1.0 / s  # ΔW[row] = s * (-1/s) * W[row] = -W[row], exactly
    assert torch.equal(W[row] + (B @ A)[row] * fl32(s), torch.zeros(W.shape[1])), "fixture error: norm is not 0"
    adapter = Case("x", source="dora_plain", drop_keys=(module + ".lora_A.weight", module + ".lora_B.weight"),
                   add={module + ".lora_A.weight": A, module + ".lora_B.weight": B}).build(arts, tmp_path / "adapter")
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
