"""Memory stays bounded by the row block, not by the tensor or the shard (format-io.md §5.5).

The merge runs in a child process under RLIMIT_DATA (anonymous + private writable memory), on a model
whose merged tensor is 256 MiB in bf16 — 512 MiB as one fp32 copy, so any whole-tensor path fails —
and whose shards are larger than the limit allows to hold. A sampling thread reads RssAnon (after
clear_refs) to report the honest anonymous peak, which must stay far below one tensor.
"""

from __future__ import annotations

import json
import textwrap

import pytest
import torch
from builders import (Streamed, SynthSpec, run_python, write_checkpoint, write_linear_pair, write_lora_adapter,
                      write_synthetic_fused_adapter, write_synthetic_moe)
from safetensors import safe_open

pytestmark = pytest.mark.slow  # merges in child processes under memory limits

ROWS, COLS, RANK = 32768, 4096, 16  # 256 MiB of bf16
LIMIT_MIB = 600

CHILD = textwrap.dedent("""
    import importlib, json, resource, sys, threading, time
    import qwen_merge
    import qwen_merge.compute.stream  # torch and the compute code, which the merge imports when it computes
    from qwen_merge import merge_shards

    options = json.loads(sys.argv[5]) if len(sys.argv) > 5 else {}  # merge_shards' keyword arguments
    for module in options.pop("preload", []):  # imported before the baseline, as compute.stream is
        importlib.import_module(module)

    def anon_kib():
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon:"):
                return int(line.split()[1])

    limit = int(sys.argv[4]) << 20
    resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
    open("/proc/self/clear_refs", "w").write("5")
    baseline, peak, done = anon_kib(), [0], []

    def sample():
        while not done:
            peak[0] = max(peak[0], anon_kib())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        report = merge_shards(sys.argv[1], sys.argv[2], sys.argv[3], progress=False, **options)
    finally:
        done.append(1)
        sampler.join()
    hwm = int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM:")).split()[1])
    print(json.dumps({"baseline_mib": baseline / 1024, "peak_mib": peak[0] / 1024, "hwm_mib": hwm / 1024,
                      "predicted_mib": report.plan.predicted_peak_bytes / 2**20}))
""")


def _build(tmp_path):
    """Two shards of one merged up_proj each, written chunk by chunk."""
    base, adapter = tmp_path / "base", tmp_path / "adapter"
    write_linear_pair(base, adapter, {f"model-0000{i + 1}-of-00002.safetensors": [
        (f"model.layers.{i}.mlp.up_proj.weight", ROWS, COLS, True)] for i in range(2)},
        rank=RANK, alpha=32, seed=0, streamed=True)
    return base, adapter


def merge_in_limited_child(base, adapter, out, **options) -> dict:
    """Merge in a child process under RLIMIT_DATA with merge_shards' keyword `options` (and `preload`: modules
    imported before the baseline is taken); its memory figures (MiB)."""
    child = run_python(CHILD, base, adapter, out, LIMIT_MIB, json.dumps(options), capture_output=True, text=True)
    assert child.returncode == 0, child.stderr[-2000:]
    return json.loads(child.stdout.strip().splitlines()[-1])


def test_merge_runs_under_a_data_limit_smaller_than_a_tensor_in_fp32(tmp_path):
    base, adapter = _build(tmp_path)
    out = tmp_path / "out"
    numbers = merge_in_limited_child(base, adapter, out)
    growth = numbers["peak_mib"] - numbers["baseline_mib"]
    print(f"anonymous memory: baseline {numbers['baseline_mib']:.0f} MiB, peak {numbers['peak_mib']:.0f} MiB "
          f"(+{growth:.0f} MiB) for a 256 MiB bf16 tensor merged in 8 MiB fp32 row blocks; "
          f"VmHWM {numbers['hwm_mib']:.0f} MiB, predicted {numbers['predicted_mib']:.0f} MiB")
    assert growth < 80, numbers
    # We never map files, so VmHWM is honest here, and the plan's prediction must cover it.
    assert numbers["hwm_mib"] <= numbers["predicted_mib"], numbers
    assert (out / "model-00002-of-00002.safetensors").stat().st_size == (base / "model-00002-of-00002.safetensors").stat().st_size


def test_an_fp32_output_in_float64_stays_within_its_prediction(tmp_path):
    """The same bf16 tensors written as fp32 (`dtype="float32"`): merged in float64 from the split factors,
    with float64 scratch, 8 MiB fp32 blocks in the ring; under the limit and within the prediction."""
    base, adapter = _build(tmp_path)
    numbers = merge_in_limited_child(base, adapter, tmp_path / "out", dtype="float32")
    growth = numbers["peak_mib"] - numbers["baseline_mib"]
    print(f"fp32 output: +{growth:.0f} MiB; VmHWM {numbers['hwm_mib']:.0f} MiB, "
          f"predicted {numbers['predicted_mib']:.0f} MiB")
    assert numbers["hwm_mib"] <= numbers["predicted_mib"], numbers
    assert growth < 150, numbers  # a ring of 8 blocks of 8 MiB and 4 staging chunks of 8 MiB, and scratch


def _build_fp8(tmp_path):
    """One FP8 block-quantized weight of the same shape (128 MiB of e4m3, 512 MiB as fp32), written chunk
    by chunk, with F32 block scales, and a LoRA adapter on it: the merge dequantizes, merges and requantizes."""
    base, adapter = tmp_path / "fp8-base", tmp_path / "fp8-adapter"
    g = torch.Generator().manual_seed(1)
    step = 1024
    codes = torch.randint(0, 0x7F, (step, COLS), generator=g, dtype=torch.uint8)  # finite e4m3 (0x7F is NaN)
    codes |= (torch.rand(step, COLS, generator=g) < 0.5).to(torch.uint8) << 7  # random signs
    weight = Streamed("F8_E4M3", (ROWS, COLS), (torch.roll(codes, 37 * i + 1, dims=1) for i in range(ROWS // step)))
    scales = torch.rand(ROWS // 128, COLS // 128, generator=g) * 1e-3 + 1e-4
    name = "model.layers.0.mlp.up_proj"
    config = {"model_type": "qwen3", "quantization_config": {"quant_method": "fp8", "fmt": "e4m3",
                                                             "activation_scheme": "dynamic",
                                                             "weight_block_size": [128, 128]}}
    write_checkpoint(base, {"model.safetensors": {f"{name}.weight_scale_inv": scales, f"{name}.weight": weight}},
                     config)
    write_lora_adapter(adapter, {name: (torch.randn(RANK, COLS, generator=g) * 0.01,
                                        torch.randn(ROWS, RANK, generator=g) * 0.01)},
                       {"peft_type": "LORA", "r": RANK, "lora_alpha": 32})
    return base, adapter


def test_fp8_merge_runs_under_the_same_data_limit(tmp_path):
    """Dequantize, merge and requantize in row blocks: the FP8 path stays under the limit too, within its
    prediction, and requantizes the weight (new scales, new bytes)."""
    base, adapter = _build_fp8(tmp_path)
    out = tmp_path / "out"
    numbers = merge_in_limited_child(base, adapter, out)
    growth = numbers["peak_mib"] - numbers["baseline_mib"]
    print(f"FP8 anonymous memory: +{growth:.0f} MiB for a 128 MiB e4m3 tensor (512 MiB as fp32); "
          f"VmHWM {numbers['hwm_mib']:.0f} MiB, predicted {numbers['predicted_mib']:.0f} MiB")
    assert growth < 80, numbers
    assert numbers["hwm_mib"] <= numbers["predicted_mib"], numbers
    name = "model.layers.0.mlp.up_proj.weight_scale_inv"
    with safe_open(base / "model.safetensors", "pt") as before, safe_open(out / "model.safetensors", "pt") as after:
        assert after.get_slice("model.layers.0.mlp.up_proj.weight").get_dtype() == "F8_E4M3"
        assert not torch.equal(before.get_tensor(name), after.get_tensor(name))  # requantized: fresh scales


def test_batched_experts_stay_within_their_prediction(tmp_path):
    """Thousands of small expert tensors merged in 4 MiB batches (the batch read ahead, in the ring, and
    twice in fp32) and the plan's own objects: the prediction covers them too."""
    spec = SynthSpec(layers=8, experts=128, hidden=128, moe_intermediate=64, vocab=4096, shards=4)
    base = write_synthetic_moe(tmp_path / "moe-base", spec)
    adapter = write_synthetic_fused_adapter(tmp_path / "moe-adapter", spec, r=8, alpha=16)
    numbers = merge_in_limited_child(base, adapter, tmp_path / "out")
    print(f"batched experts: {8 * 3 * 128} expert tensors, VmHWM {numbers['hwm_mib']:.0f} MiB, "
          f"predicted {numbers['predicted_mib']:.0f} MiB")
    assert numbers["hwm_mib"] <= numbers["predicted_mib"], numbers
