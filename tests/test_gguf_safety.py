"""The GGUF output's failure modes, resume and memory (`qwen-merge merge BASE ADAPTER out.gguf`).

* Memory: a GGUF merge of a model whose merged tensor is 256 MiB in bf16 (512 MiB as fp32) runs in a child
  process under the RLIMIT_DATA limit of test_memory.py, for q8_0 and bf16; a Qwen3-MoE whose experts are
  written slice by slice into stacked tensors larger than the growth allowed stays under it too.
* Atomicity and resume: a SIGKILL mid-write leaves no file at OUT and the partial folder; a plain rerun is
  refused naming the folder and --resume; a resume with another --outtype is refused; --resume finishes a
  file byte-identical to an uninterrupted run's; after Ctrl-C, resume writes only the shards not recorded. An
  error during the write (non-finite values, a full disk) leaves neither OUT nor a partial folder.
* Refusals, one line each: an existing OUT file (unless --overwrite), a folder at OUT, OUT inside an input,
  the gguf package missing (before anything is written), --outtype with a folder OUT or an unknown type,
  an FP8 base without --dtype bfloat16 (which then works).
* Plan: `plan ... out.gguf --json` describes the file the merge writes; `plan ADAPTER out.gguf` takes the
  base from the adapter's config.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import sys
import textwrap
import time
from pathlib import Path

import llamacpp
import pytest
import torch
from builders import (Streamed, SynthSpec, copy_tree, edit_json, edit_tensors, file_sha256, in_process_cli,
                      in_process_error_line, one_error_line, run_cli, run_python, start_cli, tree_hash,
                      write_checkpoint, write_linear_pair, write_lora_adapter, write_synthetic_fused_adapter,
                      write_synthetic_moe)
from test_memory import COLS, RANK, ROWS
from test_memory import merge_in_limited_child as memory_child

from qwen_merge import merge_shards
from qwen_merge.demo import _write_tokenizer
from qwen_merge.errors import NonFiniteError, OptionError, OutputError, QwenMergeError
from qwen_merge.sinks.gguf import GGUFSink

STATE = "qwen_merge.partial.json"
REAL_PWRITE = os.pwrite  # the tests wrap it to count writes or to fail one


def partial_of(dest: Path) -> Path:
    return dest.parent / f".{dest.name}.qwen-merge-partial"


def qwen3_config(*, hidden: int, intermediate: int, layers: int, vocab: int = 320, **extra) -> dict:
    """A config.json for a Qwen3 the GGUF output accepts (the metadata needs these fields)."""
    return {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": hidden,
            "intermediate_size": intermediate, "num_hidden_layers": layers, "num_attention_heads": 4,
            "num_key_value_heads": 2, "head_dim": 32, "vocab_size": vocab, "max_position_embeddings": 256,
            "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "tie_word_embeddings": False,
            "torch_dtype": "bfloat16", **extra}


def only_out(parent: Path, name: str = "out.gguf") -> None:
    """`parent` holds the finished file and nothing else (no partial folder, no temporary file)."""
    assert sorted(p.name for p in parent.iterdir()) == [name]


def nothing_at(dest: Path) -> None:
    """Neither the file nor its partial folder exists."""
    assert not dest.exists() and not partial_of(dest).exists(), sorted(os.listdir(dest.parent))


# --------------------------------------------------------------------------------------------------
# Memory: merges in a child process under RLIMIT_DATA

def merge_in_limited_child(base: Path, adapter: Path, out: Path, outtype: str) -> float:
    """Merge into the GGUF file `out` in a child process under RLIMIT_DATA; its anonymous growth (MiB)."""
    numbers = memory_child(base, adapter, out, outtype=outtype,
                           preload=["gguf", "gguf.quants", "qwen_merge.compute.ggufquant", "qwen_merge.sinks.gguf"])
    return numbers["peak_mib"] - numbers["baseline_mib"]


class Big:
    """Two shards of one merged 32768 x 4096 up_proj each (streamed: never held whole), as a Qwen3 with a
    tokenizer, and its q8_0 GGUF merged once under the memory limit (the uninterrupted reference)."""

    def __init__(self, root: Path) -> None:
        self.base, self.adapter = root / "base", root / "adapter"
        write_linear_pair(self.base, self.adapter, {f"model-0000{i + 1}-of-00002.safetensors": [
            (f"model.layers.{i}.mlp.up_proj.weight", ROWS, COLS, True)] for i in range(2)},
            rank=RANK, alpha=32, seed=0, factor_std=0.01, streamed=True, target_modules=["up_proj"],
            base_config=qwen3_config(hidden=COLS, intermediate=ROWS, layers=2))
        _write_tokenizer(self.base)
        self.reference = root / "reference" / "out.gguf"
        self.q8_growth = merge_in_limited_child(self.base, self.adapter, self.reference, "q8_0")


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf-big")
    yield Big(root)
    shutil.rmtree(root, ignore_errors=True)  # a GB of inputs and outputs


@pytest.mark.slow
def test_q8_0_merge_runs_under_a_data_limit_smaller_than_a_tensor_in_fp32(big):
    growth = big.q8_growth
    print(f"GGUF q8_0: anonymous peak +{growth:.0f} MiB for a 256 MiB bf16 tensor")
    assert growth < 80, f"q8_0: anonymous peak +{growth:.0f} MiB for a 256 MiB bf16 tensor (512 MiB as fp32)"
    assert big.reference.stat().st_size > 2 * ROWS * COLS  # 34 bytes per 32 values, plus the header
    only_out(big.reference.parent)


@pytest.mark.slow
def test_bf16_merge_runs_under_the_same_limit(big, tmp_path):
    out = tmp_path / "out.gguf"
    growth = merge_in_limited_child(big.base, big.adapter, out, "bf16")
    print(f"GGUF bf16: anonymous peak +{growth:.0f} MiB for a 256 MiB bf16 tensor")
    assert growth < 80, f"bf16: anonymous peak +{growth:.0f} MiB for a 256 MiB bf16 tensor (512 MiB as fp32)"
    g = llamacpp.read_gguf(out)
    up = g.tensor("blk.1.ffn_up.weight")
    assert up.ggml_type == "BF16" and len(up.data) == 2 * ROWS * COLS
    only_out(tmp_path)


@pytest.mark.slow
def test_moe_experts_written_slice_by_slice_stay_under_the_limit(tmp_path):
    """64 experts of 1024 x 512: each stacked expert tensor is 64 MiB in bf16 (256 MiB as fp32), written one
    expert's slice at a time; the growth stays below one stacked tensor."""
    spec = SynthSpec(layers=1, experts=64, hidden=512, moe_intermediate=1024, vocab=1024, shards=3)
    base = write_synthetic_moe(tmp_path / "moe-base", spec)
    edit_json(base / "config.json", {"bos_token_id": 256, "eos_token_id": 258})  # ids of the tokenizer's
    _write_tokenizer(base)
    adapter = write_synthetic_fused_adapter(tmp_path / "moe-adapter", spec, r=8, alpha=16)
    out = tmp_path / "out" / "moe.gguf"
    growth = merge_in_limited_child(base, adapter, out, "q8_0")
    print(f"GGUF MoE q8_0: anonymous peak +{growth:.0f} MiB for stacked expert tensors of 64 MiB in bf16")
    assert growth < 60, f"MoE q8_0: anonymous peak +{growth:.0f} MiB for stacked expert tensors of 64 MiB in bf16"
    g = llamacpp.read_gguf(out)
    gate = g.tensor("blk.0.ffn_gate_exps.weight")
    assert gate.ggml_type == "Q8_0" and gate.shape == (64, 1024, 512), gate.shape


# --------------------------------------------------------------------------------------------------
# Atomicity and resume

def read_state(partial: Path) -> dict:
    path = partial / STATE
    return json.loads(path.read_text()) if path.is_file() else {}


@pytest.mark.slow
def test_sigkill_leaves_the_partial_folder_and_resume_finishes_the_same_file(big, tmp_path):
    dest = tmp_path / "out.gguf"
    partial = partial_of(dest)
    args = ["merge", big.base, big.adapter, dest, "--outtype", "q8_0", "--quiet"]
    proc = start_cli(*args)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None and not read_state(partial).get("done"):
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    # (a) killed after the first shard was recorded: no file at OUT, the partial folder and its state left
    assert not dest.exists(), "the run finished before its state file recorded a shard"
    assert list(read_state(partial)["done"]) == ["model-00001-of-00002.safetensors"]
    assert (partial / dest.name).is_file()
    state = (partial / STATE).read_bytes()

    # (b) a plain rerun is refused, naming the folder and --resume; the folder is kept as it was
    line = one_error_line(run_cli(*args))
    assert str(partial) in line and "--resume" in line, line
    # (d) a resume with another outtype is refused, naming the change
    line = one_error_line(run_cli(*args[:-3], "--outtype", "bf16", "--quiet", "--resume"))
    assert str(partial) in line and "outtype" in line and "bf16" in line, line
    assert not dest.exists() and (partial / STATE).read_bytes() == state
    # a state that records a shard without the file it was written into: refused, saying to start over
    other = tmp_path / "other" / "out.gguf"
    partial_of(other).mkdir(parents=True)
    shutil.copy2(partial / STATE, partial_of(other) / STATE)
    line = one_error_line(run_cli(*args[:3], other, *args[4:], "--resume"))
    assert "missing" in line and str(partial_of(other)) in line, line
    assert not other.exists()
    shutil.rmtree(other.parent)

    # (c) --resume finishes: the file is the uninterrupted run's, byte for byte; the partial folder is gone
    finished = run_cli(*args, "--resume")
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert file_sha256(dest) == file_sha256(big.reference)
    only_out(tmp_path)
    # the file holds no record of its inputs: a second --resume cannot tell it is complete, and leaves it alone
    written = dest.stat().st_mtime_ns
    line = one_error_line(run_cli(*args, "--resume"))
    assert "--overwrite" in line, line
    assert dest.stat().st_mtime_ns == written


def counting_pwrite(monkeypatch) -> list[int]:
    """os.pwrite, counted (the bytes of each write)."""
    writes = []

    def pwrite(fd, data, offset):
        writes.append(memoryview(data).nbytes)
        return REAL_PWRITE(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    return writes


def test_ctrl_c_leaves_a_resumable_file_and_resume_writes_only_the_rest(demo_inputs, tmp_path, monkeypatch,
                                                                        capsys):
    """Ctrl-C once the first shard is recorded (it arrives as the second shard is done, before that one is
    recorded): the CLI says to rerun with --resume, OUT is absent; resume (API) writes only the shards not
    recorded, and the file equals an uninterrupted run's."""
    base, adapter = demo_inputs
    reference = tmp_path / "reference" / "model.gguf"
    full = counting_pwrite(monkeypatch)
    merge_shards(base, adapter, reference, outtype="q8_0", progress=False)

    dest = tmp_path / "out" / "model.gguf"
    partial = partial_of(dest)
    record = GGUFSink._shard_written

    def interrupted_after_the_first(sink, stream):
        if read_state(partial).get("done"):
            raise KeyboardInterrupt
        record(sink, stream)

    monkeypatch.setattr(GGUFSink, "_shard_written", interrupted_after_the_first)
    proc = in_process_cli(capsys, "merge", base, adapter, dest, "--outtype", "q8_0", "--quiet")
    monkeypatch.setattr(GGUFSink, "_shard_written", record)
    assert proc.returncode == 130 and "--resume" in proc.stderr, proc.stderr
    assert not dest.exists() and list(read_state(partial)["done"]) == ["model-00001-of-00003.safetensors"]

    resumed = counting_pwrite(monkeypatch)
    merge_shards(base, adapter, dest, outtype="q8_0", progress=False, resume=True)
    assert dest.read_bytes() == reference.read_bytes()
    assert 0 < sum(resumed) < 0.8 * sum(full), (sum(resumed), sum(full))  # the first shard's tensors not rewritten
    only_out(dest.parent, dest.name)


def poisoned_adapter(demo_inputs, folder: Path) -> Path:
    """The demo adapter with one inf in the B factor of a projection in the base's last shard: factors are
    checked when first used, so the merge fails there, after the shards before it were written."""
    base, adapter = demo_inputs
    weight_map = json.loads((base / "model.safetensors.index.json").read_text())["weight_map"]
    last = sorted(set(weight_map.values()))[-1]
    target = next(n for n, shard in weight_map.items() if shard == last and n.endswith("proj.weight"))
    key = f"base_model.model.{target.removesuffix('.weight')}.lora_B.weight"
    copy_tree(adapter, folder)

    def poison(tensors: dict) -> None:
        tensors[key][3, 1] = float("inf")

    edit_tensors(folder / "adapter_model.safetensors", poison)
    return folder


def test_an_error_during_the_write_leaves_nothing(demo_inputs, tmp_path, monkeypatch, capsys):
    """(e) An inf in the adapter, met in the last shard, stops the merge after the file was begun: no OUT,
    no partial folder (API and CLI)."""
    base, _ = demo_inputs
    adapter = poisoned_adapter(demo_inputs, tmp_path / "inf-adapter")
    dest = tmp_path / "out" / "model.gguf"
    writes = counting_pwrite(monkeypatch)
    with pytest.raises(NonFiniteError, match="lora_B"):
        merge_shards(base, adapter, dest, outtype="q8_0", progress=False)
    assert len(writes) >= 3, writes  # the header and the first shards' tensors were written
    nothing_at(dest)
    line = in_process_error_line(in_process_cli(capsys, "merge", base, adapter, dest, "--quiet"))
    assert "--allow-nonfinite" in line, line
    nothing_at(dest)


def test_an_f16_file_that_overflows_is_refused_like_an_f16_folder(demo_inputs, tmp_path):
    """A bf16 base whose merged up_proj holds 1e5 (finite in bf16, beyond float16's 65504): written as an
    F16 GGUF it would hold inf. The folder output with dtype='float16' stops with NonFiniteError; the GGUF
    output must too, and write it with allow_nonfinite=True."""
    base, adapter = demo_inputs
    big = copy_tree(base, tmp_path / "base")
    name = "model.layers.0.mlp.up_proj.weight"
    shard = json.loads((big / "model.safetensors.index.json").read_text())["weight_map"][name]

    def enlarge(tensors: dict) -> None:
        tensors[name][3, 1] = 1e5

    edit_tensors(big / shard, enlarge)
    with pytest.raises(NonFiniteError, match="allow_nonfinite"):
        merge_shards(big, adapter, tmp_path / "folder", dtype="float16", progress=False)
    dest = tmp_path / "out" / "model.gguf"
    with pytest.raises(NonFiniteError, match="allow_nonfinite"):
        merge_shards(big, adapter, dest, outtype="f16", progress=False)
    nothing_at(dest)
    merge_shards(big, adapter, dest, outtype="f16", allow_nonfinite=True, progress=False)
    up = llamacpp.read_gguf(dest).tensor("blk.0.ffn_up.weight")
    assert not torch.frombuffer(bytearray(up.data), dtype=torch.float16).isfinite().all()


def test_a_full_disk_during_the_write_leaves_nothing(demo_inputs, tmp_path, monkeypatch, capsys):
    """(e) The destination's disk fills up after the header and some tensors: no OUT, no partial folder."""
    base, adapter = demo_inputs
    dest = tmp_path / "model.gguf"
    calls = []

    def pwrite(fd, data, offset):
        calls.append(offset)
        if len(calls) > 3:  # the header and two runs of tensors written
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return REAL_PWRITE(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    with pytest.raises(OutputError) as caught:
        merge_shards(base, adapter, dest, progress=False)
    assert len(calls) >= 4 and "space" in str(caught.value).lower(), caught.value  # one per converter after it
    nothing_at(dest)
    calls.clear()
    line = in_process_error_line(in_process_cli(capsys, "merge", base, adapter, dest, "--quiet"))
    assert "space" in line.lower(), line
    nothing_at(dest)


def test_an_existing_file_is_replaced_only_with_overwrite(demo_inputs, tmp_path, capsys):
    """(f) An existing OUT file: one line naming --overwrite and the file left alone; with it, replaced."""
    base, adapter = demo_inputs
    dest = tmp_path / "model.gguf"
    dest.write_bytes(b"not yet a model")
    line = in_process_error_line(in_process_cli(capsys, "merge", base, adapter, dest, "--quiet"))
    assert str(dest) in line and "--overwrite" in line, line
    with pytest.raises(OutputError, match="overwrite=True"):
        merge_shards(base, adapter, dest, progress=False)
    assert dest.read_bytes() == b"not yet a model"
    only_out(tmp_path, dest.name)
    done = in_process_cli(capsys, "merge", base, adapter, dest, "--quiet", "--overwrite")
    assert done.returncode == 0, done.stderr
    assert dest.read_bytes()[:4] == b"GGUF" and dest.stat().st_size > 100_000
    only_out(tmp_path, dest.name)


def test_a_folder_at_out_or_out_inside_an_input_is_refused(demo_inputs, tmp_path, capsys):
    """(f) A folder named like the file, even with --overwrite, and OUT inside the base folder: one line,
    nothing written."""
    base, adapter = demo_inputs
    folder = tmp_path / "model.gguf"
    (folder / "keep").mkdir(parents=True)
    for extra in ((), ("--overwrite",)):
        line = in_process_error_line(in_process_cli(capsys, "merge", base, adapter, folder, "--quiet", *extra))
        assert str(folder) in line and "folder" in line, line
    assert [p.name for p in folder.iterdir()] == ["keep"] and not partial_of(folder).exists()
    with pytest.raises(OutputError, match="is a folder"):
        merge_shards(base, adapter, folder, progress=False, overwrite=True)

    before = tree_hash(base)
    inside = base / "merged.gguf"
    line = in_process_error_line(in_process_cli(capsys, "merge", base, adapter, inside, "--quiet"))
    assert str(inside) in line and "inside the input" in line, line
    with pytest.raises(OutputError, match="inside the input"):
        merge_shards(base, adapter, inside, progress=False)
    assert tree_hash(base) == before


NO_GGUF = textwrap.dedent("""
    import sys
    sys.modules["gguf"] = None  # as if the package were not installed
    from qwen_merge.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def test_without_the_gguf_package_the_merge_stops_before_writing(demo_inputs, tmp_path, monkeypatch, capsys):
    """(g) One line saying how to install it, from the CLI (merge in a subprocess; plan) and the API; nothing
    written."""
    base, adapter = demo_inputs
    dest = tmp_path / "out" / "model.gguf"
    proc = run_python(NO_GGUF, "merge", base, adapter, dest, "--outtype", "q8_0", capture_output=True, text=True,
                      timeout=60)
    line = one_error_line(proc)
    assert 'pip install "qwen-merge[gguf]"' in line, line
    assert not dest.parent.exists()
    monkeypatch.setitem(sys.modules, "gguf", None)
    line = in_process_error_line(in_process_cli(capsys, "plan", base, adapter, dest))
    assert 'pip install "qwen-merge[gguf]"' in line, line
    with pytest.raises(OptionError, match=r'pip install "qwen-merge\[gguf\]"'):
        merge_shards(base, adapter, dest, progress=False)
    assert not dest.parent.exists()


def test_outtype_is_refused_for_a_folder_and_an_unknown_type(demo_inputs, tmp_path, capsys):
    """(h) --outtype with a folder OUT names --outtype; an unknown type lists the choices."""
    base, adapter = demo_inputs
    folder = tmp_path / "merged"
    for command in ("merge", "plan"):
        line = in_process_error_line(in_process_cli(capsys, command, base, adapter, folder, "--outtype", "q8_0"))
        assert "--outtype" in line and str(folder) in line, line
    with pytest.raises(OptionError, match="GGUF"):
        merge_shards(base, adapter, folder, outtype="q8_0", progress=False)
    assert not folder.exists()

    dest = tmp_path / "model.gguf"
    for command in ("merge", "plan"):
        line = in_process_error_line(in_process_cli(capsys, command, base, adapter, dest, "--outtype", "q4_k"))
        assert "--outtype" in line and "q4_k" in line, line
        assert all(t in line for t in ("bf16", "f16", "f32", "q8_0")), line
    with pytest.raises(OptionError, match="q8_0"):
        merge_shards(base, adapter, dest, outtype="q4_k", progress=False)
    nothing_at(dest)


# --------------------------------------------------------------------------------------------------
# Plan

def _padded(n: int) -> int:
    return -(-n // 32) * 32


def test_plan_json_describes_the_file_the_merge_writes(demo_inputs, tmp_path, capsys):
    base, adapter = demo_inputs
    dest = tmp_path / "model.gguf"
    proc = in_process_cli(capsys, "plan", base, adapter, dest, "--outtype", "q8_0", "--json")
    assert proc.returncode == 0, proc.stderr
    section = json.loads(proc.stdout)["gguf"]
    tensors = section["tensors"]
    assert section["outtype"] == "q8_0" and {t["type"] for t in tensors} == {"Q8_0", "F32"}
    assert sum(_padded(t["bytes"]) for t in tensors) == section["data_bytes"]
    offsets = [0]
    for t in tensors[:-1]:
        offsets.append(offsets[-1] + _padded(t["bytes"]))
    assert [t["offset"] for t in tensors] == offsets
    assert not dest.exists() and not partial_of(dest).exists()  # a plan writes nothing

    merge_shards(base, adapter, dest, outtype="q8_0", progress=False)
    written = llamacpp.read_gguf(dest)
    assert [(t.name, list(t.shape), t.ggml_type, len(t.data)) for t in written.tensors] == \
        [(t["name"], t["shape"], t["type"], t["bytes"]) for t in tensors]
    assert dest.stat().st_size - section["data_bytes"] >= 0 and (dest.stat().st_size - section["data_bytes"]) % 32 == 0


def test_plan_takes_the_base_from_the_adapter_config(demo_inputs, monkeypatch, capsys):
    """`qwen-merge plan ADAPTER out.gguf`: the demo adapter names "base", found from the folder above both."""
    base, adapter = demo_inputs
    monkeypatch.chdir(adapter.parent)
    proc = in_process_cli(capsys, "plan", "adapter", "out.gguf", "--json")
    assert proc.returncode == 0, proc.stderr
    section = json.loads(proc.stdout)["gguf"]
    assert section["architecture"] == "qwen3" and section["outtype"] == "bf16"
    assert not (adapter.parent / "out.gguf").exists()
    text = in_process_cli(capsys, "plan", "adapter", "out.gguf")
    assert text.returncode == 0 and "out.gguf: qwen3, bf16; 47 tensors" in text.stdout, text.stdout + text.stderr


# --------------------------------------------------------------------------------------------------
# An FP8 base

def write_fp8_pair(root: Path) -> tuple[Path, Path]:
    """A Qwen3 whose one up_proj (256 x 128) is block-quantized FP8 with F32 scales, with a tokenizer, and
    a LoRA adapter on it (no transformers: written straight to safetensors)."""
    g = torch.Generator().manual_seed(3)
    rows, cols = 256, 128
    codes = torch.randint(0, 0x7F, (rows, cols), generator=g, dtype=torch.uint8)
    codes |= (torch.rand(rows, cols, generator=g) < 0.5).to(torch.uint8) << 7
    name = "model.layers.0.mlp.up_proj"
    quant = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
    base, adapter = root / "fp8-base", root / "fp8-adapter"
    write_checkpoint(base, {"model.safetensors": {
        f"{name}.weight": Streamed("F8_E4M3", (rows, cols), [codes]),
        f"{name}.weight_scale_inv": torch.rand(rows // 128, cols // 128, generator=g) * 1e-3 + 1e-4}},
        qwen3_config(hidden=cols, intermediate=rows, layers=1, quantization_config=quant))
    _write_tokenizer(base)
    write_lora_adapter(adapter, {name: (torch.randn(8, cols, generator=g) * 0.1, torch.randn(rows, 8, generator=g))},
                       {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["up_proj"]})
    return base, adapter


def test_an_fp8_base_needs_dtype_bfloat16(tmp_path, capsys):
    """Refused without --dtype (one line saying to pass --dtype bfloat16); with it, the file holds the bf16
    merge's weight byte for byte."""
    base, adapter = write_fp8_pair(tmp_path)
    dest = tmp_path / "fp8.gguf"
    line = in_process_error_line(in_process_cli(capsys, "merge", base, adapter, dest, "--quiet"))
    assert "--dtype bfloat16" in line, line
    with pytest.raises(QwenMergeError, match="bfloat16"):
        merge_shards(base, adapter, dest, progress=False)
    nothing_at(dest)

    report = merge_shards(base, adapter, dest, dtype="bfloat16", progress=False)
    assert Path(report.output) == dest
    folder = merge_shards(base, adapter, tmp_path / "bf16-folder", dtype="bfloat16", progress=False).output
    from safetensors import safe_open

    with safe_open(Path(folder) / "model.safetensors", "pt") as f:
        expected = f.get_tensor("model.layers.0.mlp.up_proj.weight")
    up = llamacpp.read_gguf(dest).tensor("blk.0.ffn_up.weight")
    assert up.ggml_type == "BF16" and up.data == expected.view(torch.uint16).numpy().tobytes()
