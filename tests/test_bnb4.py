"""bitsandbytes 4-bit (QLoRA) bases: dequantized in the stream, merged, written in the compute dtype.

* The dequantization (`compute.bnb4dequant`, on row blocks as the planner cuts them) equals bitsandbytes'
  `dequantize_4bit` bit for bit: NF4 and FP4, with and without double quantization, in bf16, fp16 and fp32,
  ragged shapes included (there against bitsandbytes' reference torch backend, see below).
* Bases quantized by transformers + bitsandbytes and saved with `save_pretrained` (`bnb_models`): the
  merged tensors equal PEFT's merge_and_unload() on the model of the dequantized weights under the suite's
  bounds (`reference.check_rounded`), every other quantized weight equals `dequantize_4bit` exactly, plain
  tensors are kept (or converted to the output dtype once), no companion tensor or quantization_config is
  left, and plain transformers loads the output and computes what the unmerged adapter computes.
* The plan says what happens; 8-bit bases and malformed checkpoints are one line each.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from bnb_models import (SPECS, STATE_MARK, build_adapter, build_bnb4_base, dequantized_model_factory, plain_state,
                        stored_tensors, write_dequantized)
from builders import (check_like_unmerged, disk_tensors, in_process_cli, in_process_error_line, logits, random_ids,
                      rewrite_checkpoint, write_checkpoint)
from reference import U32, Exact, check_rounded
from test_against_peft import MAX_NEAR_BOUNDARY_SHARE

from qwen_merge import FormatError, iter_merged, merge_shards, plan_merge, verify_merge
from qwen_merge.compute import bnb4dequant
from qwen_merge.report import render, to_dict

pytest.importorskip("bitsandbytes")  # the test extra installs it

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
INT_VIEW = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bit patterns (so -0.0 and +0.0 differ)."""
    return t.view(INT_VIEW[t.dtype])


# -- the arithmetic, against bitsandbytes ----------------------------------------------------------------

def _ours(packed: torch.Tensor, state, shape: tuple[int, int], dtype: torch.dtype, block_rows: int) -> torch.Tensor:
    """Our dequantization of a bitsandbytes-quantized tensor, in row blocks of a multiple of the rows that
    hold whole absmax blocks (as the planner cuts them)."""
    rows, cols = shape
    step = state.blocksize // math.gcd(cols, state.blocksize)
    block_rows = max(step, block_rows // step * step)
    codes = packed.view(torch.uint8).reshape(-1)
    if state.nested:
        absmax = bnb4dequant.absmax32(state.absmax, state.state2.absmax, state.state2.code, state.state2.blocksize,
                                      float(state.offset))
    else:
        absmax = bnb4dequant.absmax32(state.absmax)
    table = bnb4dequant.code_table(state.code)
    out = torch.empty(rows, cols, dtype=dtype)
    for row0 in range(0, rows, block_rows):
        n = min(block_rows, rows - row0)
        first, count = row0 * cols, n * cols
        span = codes[first // 2:-(-(first + count) // 2)]
        values = bnb4dequant.dequantize(span, first, count, table, absmax, state.blocksize,
                                        torch.empty(2 * len(span)), torch.empty(len(span), dtype=torch.int32))
        out[row0:row0 + n] = values.view(n, cols)
    return out


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True], ids=["plain", "double"])
def test_dequantization_is_bitsandbytes_bit_for_bit(quant_type, nested):
    """Every shape whose rows hold whole 64-value blocks, against `dequantize_4bit`; ragged shapes (blocks
    that span rows, an odd value count) against bitsandbytes' reference backend, `_dequantize_4bit_compute`:
    bitsandbytes' CPU kernel reads another block's absmax for some of them (its values stray several times
    further from the weights than the quantization allows) and writes -0.0 for FP4's code 8 there, while its
    reference backend computes the formula."""
    import bitsandbytes.functional as F
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    g = torch.Generator().manual_seed(7)
    for shape in ((64, 128), (96, 64), (3, 512), (33, 100), (16, 96), (7, 3)):
        w = torch.randn(shape, generator=g) * 0.05
        w[0, :9] = 0  # FP4's code 8 (-0.0) and NF4's zero
        packed, state = F.quantize_4bit(w, blocksize=64, quant_type=quant_type, compress_statistics=nested)
        for dtype in DTYPES:
            state.dtype = dtype
            if shape[1] % 64 == 0:
                theirs = F.dequantize_4bit(packed, state)
            else:
                absmax = F.dequantize_blockwise(state.absmax, state.state2) + state.offset if nested else state.absmax
                theirs = _dequantize_4bit_compute(packed.view(-1), absmax.float(), state.code.float(), 64, shape, dtype)
            for block_rows in (1, 5, shape[0]):
                ours = _ours(packed, state, shape, dtype, block_rows)
                assert torch.equal(_bits(ours), _bits(theirs)), (shape, dtype, block_rows)



def test_an_8bit_base_is_refused_in_one_line(tmp_path, capsys):
    base = write_checkpoint(tmp_path / "base", {"model.safetensors": {
        "model.layers.0.self_attn.q_proj.weight": torch.zeros(8, 8, dtype=torch.int8),
        "model.layers.0.self_attn.q_proj.SCB": torch.ones(8)}},
        config={"model_type": "qwen3", "quantization_config": {"quant_method": "bitsandbytes", "load_in_8bit": True}})
    with pytest.raises(FormatError) as e:
        plan_merge(base, _any_adapter(tmp_path))
    assert str(e.value) == (f"{base / 'config.json'}: BASE is a bitsandbytes 8-bit (LLM.int8) checkpoint, which "
                            f"cannot be dequantized exactly; merge into the original unquantized model instead")
    assert in_process_error_line(in_process_cli(capsys, "plan", base, _any_adapter(tmp_path))) == f"error: {e.value}"


def _any_adapter(tmp_path):
    from builders import write_lora_adapter

    folder = tmp_path / "adapter"
    if not folder.exists():
        write_lora_adapter(folder, {"model.layers.0.self_attn.q_proj": (torch.zeros(2, 8), torch.zeros(8, 2))},
                           {"peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": ["q_proj"]})
    return folder


# -- transformers' 4-bit checkpoints ---------------------------------------------------------------------

@pytest.fixture(scope="session")
def bnb4(tmp_path_factory):
    """name -> (4-bit base, adapter, merged output, plain checkpoint of the bitsandbytes-dequantized weights),
    built once per session on first use."""
    root = tmp_path_factory.mktemp("bnb4")
    made = {}

    def get(name: str):
        if name not in made:
            spec = SPECS[name]
            base, plain = build_bnb4_base(spec, root)
            adapter = build_adapter(spec, plain, root / f"{name}-adapter")
            out = root / f"{name}-out"
            merge_shards(base, adapter, out, progress=False)
            made[name] = base, adapter, out, write_dequantized(base, root / f"{name}-dequantized", spec.compute)
        return made[name]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SPECS))
def test_a_4bit_base_merges_as_peft_does_on_its_dequantized_weights(bnb4, name):
    base, adapter, out, dequantized = bnb4(name)
    spec = SPECS[name]
    ours, stored = disk_tensors(out), stored_tensors(base)
    make = dequantized_model_factory(dequantized, spec.compute)
    from peft import PeftModel

    peft = PeftModel.from_pretrained(make(), adapter).merge_and_unload().state_dict()
    exact = Exact.of(make, adapter)
    deq = plain_state(base, spec.compute)
    assert set(ours) == set(deq), "the output holds the plain model's tensors, no absmax/quant_map/quant_state"
    quantized = {k.partition(STATE_MARK)[0] for k in stored if STATE_MARK in k}
    merged = {op.name for op in plan_merge(base, adapter).merges}
    assert quantized & merged and quantized - merged, "fixture: some 4-bit weights merged, some not"
    near = 0
    for name_, tensor in ours.items():
        assert tensor.dtype == spec.compute, name_
        if name_ not in merged:  # dequantized by bitsandbytes, or a plain tensor in the output dtype
            assert torch.equal(_bits(tensor), _bits(deq[name_].to(spec.compute))), name_
            continue
        near += check_rounded(tensor, peft[name_].detach(), exact.merged[name_], exact.bands(name_, U32))
    assert near <= MAX_NEAR_BOUNDARY_SHARE * sum(ours[k].numel() for k in merged), "a vacuous band"
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == str(spec.compute).removeprefix("torch.")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["nf4_double", "moe_nf4"])
def test_the_output_loads_in_transformers_and_computes_what_the_unmerged_adapter_does(bnb4, name):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base, adapter, out, dequantized = bnb4(name)
    dtype = SPECS[name].compute
    ids = random_ids(320)
    ours = logits(AutoModelForCausalLM.from_pretrained(out), ids)
    make = dequantized_model_factory(dequantized, dtype)
    unmerged = logits(PeftModel.from_pretrained(make(), adapter), ids)
    check_like_unmerged(name, ours, unmerged, logits(make(), ids), min_effect=0.01)


@pytest.mark.slow
def test_verify_and_iter_merged_recompute_the_same_tensors(bnb4):
    base, adapter, out, _ = bnb4("fp4_bf16_storage")
    report = verify_merge(out, base, adapter, full=True)
    assert report.ok, report.problems
    files = disk_tensors(out)
    streamed = dict(iter_merged(base, adapter))
    assert set(streamed) == set(files)
    assert all(torch.equal(streamed[k], files[k]) for k in files)


@pytest.mark.slow
def test_the_plan_says_what_happens_and_why(bnb4):
    base, adapter, _, _ = bnb4("nf4_double")
    plan = plan_merge(base, adapter)
    note = next(n for n in plan.notes if "bitsandbytes" in n)
    assert note == (f"BASE is a bitsandbytes NF4 checkpoint: merging onto its 14 dequantized 4-bit weights (what a "
                    f"QLoRA adapter was trained against), written in bfloat16; the original unquantized model would "
                    f"give a different model")
    text = render(plan)
    assert f"note:    {note}" in text and "config.json: quantization_config removed" in text
    assert "bnb4:    14 4-bit weights dequant → BF16" in text
    assert note in to_dict(plan)["notes"]
    tensors = {t["name"]: t for t in to_dict(plan)["tensors"]}
    assert tensors["model.layers.0.self_attn.k_proj.weight"]["dequant"] is True
    assert not any(STATE_MARK in t or t.endswith(".absmax") for t in tensors)


@pytest.mark.slow
def test_a_dtype_asked_for_is_the_output_dtype(bnb4, tmp_path):
    base, adapter, _, _ = bnb4("nf4_double")
    out = tmp_path / "out"
    merge_shards(base, adapter, out, dtype="float32", progress=False)
    ours = disk_tensors(out)
    deq = plain_state(base, torch.float32)
    assert all(t.dtype == torch.float32 for t in ours.values())
    k = "model.layers.1.self_attn.k_proj.weight"  # not targeted: bitsandbytes' fp32 dequantization
    assert torch.equal(ours[k], deq[k])
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"


def _broken(bnb4, tmp_path, edit):
    base = bnb4("nf4_double")[0]
    return rewrite_checkpoint(base, tmp_path / "broken", edit)


MALFORMED = {
    "missing absmax": (lambda name, t: None if name == "model.layers.1.mlp.up_proj.weight.absmax" else t,
                       "bitsandbytes 4-bit weight model.layers.1.mlp.up_proj.weight has no "
                       "'model.layers.1.mlp.up_proj.weight.absmax' tensor; expected U8 [128]"),
    "absmax shape": (lambda name, t: t[:-1] if name == "model.layers.1.mlp.up_proj.weight.absmax" else t,
                     "'model.layers.1.mlp.up_proj.weight.absmax' is U8 [127]; expected U8 [128] for a [128, 64] "
                     "weight"),
    "quant_state JSON": (lambda name, t: torch.frombuffer(bytearray(b"{not json" + b" " * (len(t) - 9)),
                                                          dtype=torch.uint8)
                         if name == "model.layers.1.mlp.up_proj.weight.quant_state.bitsandbytes__nf4" else t,
                         "tensor 'model.layers.1.mlp.up_proj.weight.quant_state.bitsandbytes__nf4' is not a "
                         "bitsandbytes quant_state: its bytes are not JSON"),
    "missing quant_state": (lambda name, t: None if name == "model.layers.1.mlp.up_proj.weight" + STATE_MARK + "nf4"
                            else t,
                            "bitsandbytes 4-bit weight model.layers.1.mlp.up_proj.weight has an absmax but no "
                            "model.layers.1.mlp.up_proj.weight.quant_state.bitsandbytes__nf4 (or __fp4) tensor"),
    "packed size": (lambda name, t: t[:-1] if name == "model.layers.1.mlp.up_proj.weight" else t,
                    "'model.layers.1.mlp.up_proj.weight' holds 4095 bytes; expected 4096 (two 4-bit codes per byte) "
                    "for a [128, 64] weight"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_malformed_checkpoint_is_one_line_naming_the_file_and_tensor(bnb4, tmp_path, capsys, case):
    edit, expected = MALFORMED[case]
    broken = _broken(bnb4, tmp_path, lambda name, tensors: {k: v for k, t in tensors.items()
                                                            if (v := edit(k, t)) is not None})
    adapter = bnb4("nf4_double")[1]
    with pytest.raises(FormatError) as e:
        plan_merge(broken, adapter)
    message = str(e.value)
    assert "\n" not in message and message.startswith(str(broken)) and expected in message, message
    assert in_process_error_line(in_process_cli(capsys, "plan", broken, adapter)) == f"error: {message}"


@pytest.mark.slow
def test_a_hub_base_is_planned_from_headers_and_ranges_and_merges_as_the_local_one(bnb4, tmp_path, monkeypatch):
    """The quant_states a plan needs come with one range request each: planning downloads no shard."""
    from builders import shard_files, tree_hash
    from hubserver import FakeHub, use_hub

    base, adapter, out, _ = bnb4("nf4_double")
    with FakeHub() as server:
        server.add_repo("org/qwen3-bnb-4bit", base)
        use_hub(monkeypatch, server, tmp_path / "hf-cache", home=tmp_path / "hf-home", fast_retries=True)
        plan = plan_merge("org/qwen3-bnb-4bit", adapter)
        assert any("bitsandbytes NF4" in n for n in plan.notes)
        assert sum(server.count("GET", name, ranged=False) for name in shard_files(base)) == 0
        merge_shards("org/qwen3-bnb-4bit", adapter, tmp_path / "out", progress=False)
    ours, local = tree_hash(tmp_path / "out"), tree_hash(out)
    ours.pop("qwen_merge.json"), local.pop("qwen_merge.json")
    assert ours == local


@pytest.mark.slow
def test_memory_is_bounded_by_the_row_block_not_the_4bit_weight(tmp_path):
    """A 16384 x 1024 weight (64 MiB in fp32, 32 MiB in the bf16 output) merged under a memory limit with
    1 MiB row blocks: the merge grows by far less than the weight, and within the plan's prediction."""
    from bnb_models import LARGE
    from test_memory import merge_in_limited_child

    base, plain = build_bnb4_base(LARGE, tmp_path)
    adapter = build_adapter(LARGE, plain, tmp_path / "adapter")
    numbers = merge_in_limited_child(base, adapter, tmp_path / "out", block_bytes=1 << 20)
    growth = numbers["peak_mib"] - numbers["baseline_mib"]
    print(f"4-bit base: +{growth:.0f} MiB for 64 MiB fp32 weights; VmHWM {numbers['hwm_mib']:.0f} MiB, predicted "
          f"{numbers['predicted_mib']:.0f} MiB")
    assert growth < 32, numbers
    assert numbers["hwm_mib"] <= numbers["predicted_mib"], numbers


@pytest.mark.slow
def test_the_gguf_output_holds_the_folder_output_s_tensors(bnb4, tmp_path):
    """`OUT.gguf` from a 4-bit base (bf16 outtype): the same dequantized and merged tensors as the folder."""
    from gguf_models import build_tokenizer
    from llamacpp import read_gguf

    base, adapter, out, _ = bnb4("nf4_double")
    with_tokenizer = tmp_path / "base"
    shutil.copytree(base, with_tokenizer)
    for path in build_tokenizer(tmp_path / "tokenizer").iterdir():
        shutil.copy(path, with_tokenizer)
    merge_shards(with_tokenizer, adapter, tmp_path / "out.gguf", outtype="bf16", progress=False)
    gguf, folder = read_gguf(tmp_path / "out.gguf"), disk_tensors(out)
    for ours, name in (("blk.0.attn_q.weight", "model.layers.0.self_attn.q_proj.weight"),  # merged
                       ("blk.1.ffn_down.weight", "model.layers.1.mlp.down_proj.weight"),  # merged
                       ("blk.1.attn_k.weight", "model.layers.1.self_attn.k_proj.weight")):  # dequantized only
        tensor = gguf.tensor(ours)
        assert tensor.ggml_type == "BF16" and tensor.shape == tuple(folder[name].shape), ours
        assert tensor.data == folder[name].contiguous().view(torch.uint8).numpy().tobytes(), ours
