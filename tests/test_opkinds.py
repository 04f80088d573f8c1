"""Op kinds (`planning.plan.OpKind`): the planner gives each op its kind once, for the case the kind names,
and every consumer (the run's `stream.Computer`, `verify`, the report) has a branch for every kind.

The inputs are the demo pair (`demo_inputs`) with what each kind needs added: a bias on one projection
with a LoRA bias for it (BIAS), a modules_to_save lm_head in the base's dtype (COPY), trainable tokens on
the embedding (TOKENS); the same pair with an output dtype (CONVERT); and the demo base quantized to
block-wise FP8 (REQUANT, SCALES).
"""

from __future__ import annotations

import ast
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from builders import (ADAPTER_ST, PREFIX, checkpoint_tensors, in_process_cli, rewrite_adapter, rewrite_checkpoint,
                      tensor_bytes, to_tensor)
from fp8ref import quantize_checkpoint
from safetensors.torch import load_file

import qwen_merge
from qwen_merge import plan_merge, report, verify_merge
from qwen_merge.compute.stream import Computer
from qwen_merge.planning.plan import OpKind

PACKAGE = Path(qwen_merge.__file__).parent
BIASED = "model.layers.0.self_attn.q_proj"
TOKEN_IDS = [3, 7]

# kind -> (inputs, options, a tensor the planner gives that kind, its `plan --json` action)
CASES = {
    OpKind.COPY: ("everything", {}, "lm_head.weight", "replace"),  # modules_to_save, in the base's dtype
    OpKind.CONVERT: ("everything", {"dtype": "float32"}, "model.norm.weight", "convert"),
    OpKind.TOKENS: ("everything", {}, "model.embed_tokens.weight", "tokens"),
    OpKind.MERGE: ("everything", {}, "model.layers.1.mlp.up_proj.weight", "merge"),
    OpKind.BIAS: ("everything", {}, BIASED + ".bias", "merge"),
    OpKind.REQUANT: ("fp8", {}, "model.layers.0.mlp.down_proj.weight", "merge"),
    OpKind.SCALES: ("fp8", {}, "model.layers.0.mlp.down_proj.weight_scale_inv", "scales"),
}


@pytest.fixture(scope="module")
def inputs(demo_inputs, tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """name -> (base, adapter): "everything" (every kind but FP8's) and "fp8"."""
    base, adapter = demo_inputs
    root = tmp_path_factory.mktemp("opkinds")
    g = torch.Generator().manual_seed(5)
    rows = load_file(adapter / ADAPTER_ST)[PREFIX + BIASED + ".lora_B.weight"].shape[0]
    bias = (torch.randn(rows, generator=g) * 0.05).to(torch.bfloat16)

    def add_bias(shard: str, tensors: dict) -> dict:
        return {**tensors, BIASED + ".bias": bias} if BIASED + ".weight" in tensors else tensors

    biased = rewrite_checkpoint(base, root / "base", add_bias)
    head = checkpoint_tensors(base)["lm_head.weight"]
    embed_cols = checkpoint_tensors(base)["model.embed_tokens.weight"][2][1]
    extra = {PREFIX + BIASED + ".lora_B.bias": torch.randn(rows, generator=g) * 0.1,
             PREFIX + "lm_head.weight": to_tensor(*head[1:]) + 0.25,
             PREFIX + "model.embed_tokens.token_adapter.trainable_tokens_delta":
                 (torch.randn(len(TOKEN_IDS), embed_cols, generator=g)).to(torch.bfloat16)}
    everything = rewrite_adapter(adapter, root / "adapter", add=extra, config={
        "lora_bias": True, "modules_to_save": ["lm_head"], "trainable_token_indices": TOKEN_IDS})
    fp8 = quantize_checkpoint(base, root / "fp8")
    return {"everything": (biased, everything), "fp8": (fp8, adapter)}


def _plan(inputs, case: str, options: dict):
    return plan_merge(*inputs[case], **options)


def test_every_kind_has_a_case_below():
    assert set(CASES) == set(OpKind), "a kind without a planned case in CASES"


@pytest.mark.parametrize("kind", list(OpKind), ids=lambda k: k.name)
def test_each_kind_is_planned_for_the_case_it_names(inputs, kind):
    case, options, name, action = CASES[kind]
    plan = _plan(inputs, case, options)
    ops = {op.name: op for op in plan.ops}
    assert ops[name].kind is kind, f"{name}: planned as {ops[name].kind}"
    assert ops[name].is_raw_copy == (kind is OpKind.COPY)
    tensors = {t["name"]: t for t in report.to_dict(plan)["tensors"]}
    assert tensors[name]["action"] == action
    if kind is OpKind.SCALES:
        assert ops[name].scales_of is ops[name.removesuffix("_scale_inv")]


def test_the_planner_gives_each_tensor_the_kind_of_what_happens_to_it(inputs):
    """Not only the named tensors: every op of the plans, by what the inputs do to its tensor."""
    plain = {op.name: op.kind for op in _plan(inputs, "everything", {}).ops}
    assert plain.pop("lm_head.weight") is OpKind.COPY
    assert plain.pop("model.embed_tokens.weight") is OpKind.TOKENS
    assert plain.pop(BIASED + ".bias") is OpKind.BIAS
    assert set(plain.values()) == {OpKind.MERGE} and len(plain) == 28  # 4 layers x 7 projections
    wide = {op.name: op.kind for op in _plan(inputs, "everything", {"dtype": "float32"}).ops}
    assert wide["lm_head.weight"] is OpKind.CONVERT  # the bf16 replacement in another dtype
    assert {wide[n] for n in wide if "norm" in n} == {OpKind.CONVERT}
    fp8 = _plan(inputs, "fp8", {})
    weights = [op for op in fp8.ops if op.kind is OpKind.REQUANT]
    assert len(weights) == 28 and {op.kind for op in fp8.ops} == {OpKind.REQUANT, OpKind.SCALES}
    assert {op.name for op in fp8.ops if op.kind is OpKind.SCALES} == {op.requant.name for op in weights}
    dequantized = _plan(inputs, "fp8", {"dtype": "bfloat16"})
    assert {op.kind for op in dequantized.ops} == {OpKind.MERGE} and all(op.dequant for op in dequantized.ops)


@pytest.mark.parametrize("case,options", [("everything", []), ("everything", ["--dtype", "float32"]), ("fp8", [])])
def test_every_kind_merges_and_verifies_on_the_command_line_and_in_python(inputs, case, options, tmp_path, capsys):
    base, adapter = inputs[case]
    out = tmp_path / "out"
    assert in_process_cli(capsys, "merge", base, adapter, out, "--quiet", *options).returncode == 0
    checked = in_process_cli(capsys, "verify", out, "--base", base, "--adapter", adapter, "--full")
    assert checked.returncode == 0 and "verify: OK" in checked.stdout, checked.stdout + checked.stderr
    assert verify_merge(out, base, adapter, full=True).ok
    if case == "everything" and not options:  # the bytes of COPY and TOKENS, from the adapter's own
        merged, extra = checkpoint_tensors(out), load_file(adapter / ADAPTER_ST)
        assert merged["lm_head.weight"][3] == tensor_bytes(extra[PREFIX + "lm_head.weight"])
        embed = to_tensor(*merged["model.embed_tokens.weight"][1:])
        rows = extra[PREFIX + "model.embed_tokens.token_adapter.trainable_tokens_delta"]
        assert torch.equal(embed[TOKEN_IDS].view(torch.int16), rows.view(torch.int16))


def test_the_plan_text_and_json_say_what_each_kind_does(inputs, capsys):
    base, adapter = inputs["everything"]
    document = json.loads(in_process_cli(capsys, "plan", base, adapter, "--json").stdout)
    actions = {t["name"]: t["action"] for t in document["tensors"]}
    assert (actions["lm_head.weight"], actions["model.embed_tokens.weight"], actions[BIASED + ".bias"]) == (
        "replace", "tokens", "merge")
    text = in_process_cli(capsys, "plan", base, adapter).stdout
    assert f"merge    {BIASED}.bias  bias r=8" in text
    assert "other:   2 tensors replaced or with token rows set" in text
    fp8 = in_process_cli(capsys, "plan", *inputs["fp8"]).stdout
    assert "fp8:     28 merged FP8 weights dequant → merge → requant" in fp8


# -- every consumer has a branch for every kind ---------------------------------------------------------


def _kind_matches() -> Iterator[tuple[str, str, set[str], bool]]:
    """Every `match` in the package whose cases name op kinds: (module, function, kinds named, whether a
    wildcard or capture case would swallow a kind added later)."""
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for function in (n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)):
            for node in (n for n in ast.walk(function) if isinstance(n, ast.Match)):
                named = {n.attr for case in node.cases for n in ast.walk(case.pattern) if isinstance(n, ast.Attribute)
                         and isinstance(n.value, ast.Name) and n.value.id == "OpKind"}
                if named:
                    catch_all = any(isinstance(case.pattern, ast.MatchAs) and case.pattern.pattern is None
                                    for case in node.cases)
                    yield str(path.relative_to(PACKAGE)), function.name, named, catch_all


def test_every_match_on_an_op_kind_names_every_kind():
    """A kind added to OpKind fails here until the run and verify have a branch for it."""
    every = {k.name for k in OpKind}
    found = {(module, function): (named, catch_all) for module, function, named, catch_all in _kind_matches()}
    assert {("compute/stream.py", "blocks"), ("verify.py", "_check_op")} <= found.keys(), found.keys()
    for where, (named, catch_all) in found.items():
        assert named == every, f"{where}: no case for {sorted(every - named)}"
        assert not catch_all, f"{where}: a catch-all case would take a new kind silently"


def test_the_report_has_an_action_for_every_kind():
    assert set(report._ACTIONS) == set(OpKind)


@pytest.mark.parametrize("kind", list(OpKind), ids=lambda k: k.name)
def test_the_run_computes_every_kind(kind):
    """`Computer.blocks` dispatches every kind to a generator of blocks (nothing runs until iterated)."""

    class Op:
        pass

    op = Op()
    op.kind = kind
    blocks = Computer.blocks(object.__new__(Computer), op)
    assert isinstance(blocks, Iterator), f"{kind}: Computer.blocks has no branch for it"
    blocks.close()
