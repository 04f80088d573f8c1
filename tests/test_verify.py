"""Issue 5 §5, verification: `verify_merge` / `qwen-merge verify` pass on good outputs and name the problem
on outputs we deliberately damage.

The inputs are tiny Qwen3-shaped checkpoints built with safetensors alone (qwen_merge.demo's builders, no
transformers): an untied bf16 base with LoRA on every projection; a tied base (no lm_head stored) with an
embedding LoRA, which the merge unties; and a resized vocabulary (modules_to_save embed_tokens and lm_head
with more rows). The untied output is merged with small row blocks so its tensors span several blocks,
which is what separates the default sampling from `--full`. Damage is done with byte-level helpers that do
not use qwen_merge.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from builders import (EMBED, HEAD, INDEX, demo_pair, edit_json, edit_tensors, locate, read_header, rewrite_adapter,
                      run_cli, tensor_entries)

from qwen_merge import FormatError, merge_shards, plan_merge
from qwen_merge import verify as verify_module
from qwen_merge import verify_merge
from qwen_merge.demo import HIDDEN, VOCAB
from qwen_merge.planning.ties import Tie

BLOCK = 2048  # fp32 bytes per row block: 8 rows of a 64-column weight, so q_proj (64 rows) has 8 blocks
Q0, K0, V0 = (f"model.layers.0.self_attn.{m}_proj.weight" for m in "qkv")
GATE0 = "model.layers.0.mlp.gate_proj.weight"
NORM = "model.layers.0.input_layernorm.weight"
NEW_VOCAB = VOCAB + 8


@dataclass(frozen=True)
class Case:
    base: Path
    adapter: Path
    out: Path
    block_bytes: int

    def verify(self, out: Path | None = None, **kwargs):
        return verify_merge(out or self.out, self.base, self.adapter, block_bytes=self.block_bytes, **kwargs)


def _untie(base: Path) -> None:
    """Turn a demo base into a tied checkpoint without lm_head (as transformers v5 saves one)."""
    path, _, entry = locate(base, HEAD)
    edit_tensors(path, lambda tensors: tensors.pop(HEAD))
    size = entry["data_offsets"][1] - entry["data_offsets"][0]

    def drop(index: dict) -> None:
        del index["weight_map"][HEAD]
        index["metadata"]["total_size"] -= size

    edit_json(base / INDEX, drop)
    edit_json(base / "config.json", {"tie_word_embeddings": True})


@pytest.fixture(scope="module")
def cases(tmp_path_factory, demo_inputs) -> dict[str, Case]:
    root = tmp_path_factory.mktemp("verify")
    out = {}
    base, adapter = demo_inputs  # the session's demo pair (seed 0), read-only
    (root / "untied").mkdir()
    out["untied"] = Case(base, adapter, root / "untied" / "out", BLOCK)

    base, adapter = demo_pair(root / "tied", 1)
    _untie(base)
    g = torch.Generator().manual_seed(2)
    rewrite_adapter(adapter, add={
        "base_model.model.model.embed_tokens.lora_embedding_A": torch.randn(8, VOCAB, generator=g) * 0.1,
        "base_model.model.model.embed_tokens.lora_embedding_B": torch.randn(HIDDEN, 8, generator=g) * 0.1,
    }, config={"target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                                  "embed_tokens"]})
    out["tied"] = Case(base, adapter, root / "tied" / "out", 8 << 20)

    base, adapter = demo_pair(root / "resized", 3)
    g = torch.Generator().manual_seed(4)
    rewrite_adapter(adapter, add={
        "base_model.model.model.embed_tokens.weight": (torch.randn(NEW_VOCAB, HIDDEN, generator=g) * 0.05).bfloat16(),
        "base_model.model.lm_head.weight": (torch.randn(NEW_VOCAB, HIDDEN, generator=g) * 0.05).bfloat16(),
    }, config={"modules_to_save": ["embed_tokens", "lm_head"]})
    out["resized"] = Case(base, adapter, root / "resized" / "out", 8 << 20)

    for case in out.values():
        merge_shards(case.base, case.adapter, case.out, progress=False, block_bytes=case.block_bytes)
    return out


# -- byte-level helpers (no qwen_merge) ---------------------------------------------------------------


def read_at(path: Path, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def write_at(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def flip(path: Path, offset: int) -> None:
    write_at(path, offset, bytes([read_at(path, offset, 1)[0] ^ 0x40]))


def nbytes(entry: dict) -> int:
    return entry["data_offsets"][1] - entry["data_offsets"][0]


@pytest.fixture
def damaged(cases, tmp_path):
    """A writable copy of a good output."""
    def copy(name: str = "untied") -> Path:
        return Path(shutil.copytree(cases[name].out, tmp_path / name))
    return copy


def only(report, *needles: str) -> str:
    assert not report.ok
    assert len(report.problems) == 1, report.problems
    for needle in needles:
        assert needle in report.problems[0], report.problems[0]
    return report.problems[0]


# -- good outputs --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["untied", "tied", "resized"])
def test_good_output_passes(cases, name):
    case = cases[name]
    for full in (False, True):
        report = case.verify(full=full)
        assert report.ok and report.problems == (), report.problems
        stored = sum(len(tensor_entries(p)) for p in case.out.glob("*.safetensors"))
        assert report.checked_tensors == stored
        assert report.checked_bytes > 0


def test_good_cases_are_what_they_claim(cases):
    tied = plan_merge(cases["tied"].base, cases["tied"].adapter)
    assert tied.tie and tied.tie.tie is Tie.UNTIED and tied.config["tie_word_embeddings"] is False
    assert HEAD in {e.name for s in tied.shards for e in s.entries}
    resized = plan_merge(cases["resized"].base, cases["resized"].adapter)
    assert resized.config["vocab_size"] == NEW_VOCAB
    untied = plan_merge(cases["untied"].base, cases["untied"].adapter, block_bytes=BLOCK)
    q0 = next(op for op in untied.merges if op.name == Q0)
    assert q0.shape[0] // q0.block_rows == 8


def test_manifest_is_ignored(cases, damaged):
    out = damaged()
    (out / "qwen_merge.json").write_text('{"anything": "goes"}\n')
    assert cases["untied"].verify(out).ok


# -- damaged outputs ------------------------------------------------------------------------------------


def test_flipped_byte_in_merged_tensor(cases, damaged):
    out = damaged()
    path, start, _ = locate(out, Q0)
    flip(path, start + 3)
    only(cases["untied"].verify(out), str(path), Q0, "recomputed merge", "1 of", "row 0")


def test_flipped_byte_in_copied_tensor(cases, damaged):
    out = damaged()
    path, start, entry = locate(out, EMBED)
    flip(path, start + nbytes(entry) - 1)
    line = only(cases["untied"].verify(out), str(path), EMBED, "not byte-identical", "mismatch in 1 byte,")
    assert f"byte {nbytes(entry) - 1} of {nbytes(entry)}" in line


def test_copied_tensor_compared_in_chunks(cases, damaged, monkeypatch):
    monkeypatch.setattr(verify_module, "COPY_CHECK_CHUNK_BYTES", 100)
    out = damaged()
    path, start, entry = locate(out, EMBED)
    flip(path, start + 1234)
    flip(path, start + 4321)
    line = only(cases["untied"].verify(out), EMBED, "mismatch in 2 bytes", f"first at byte 1234 of {nbytes(entry)}")
    assert line


def test_swapped_merged_tensors(cases, damaged):
    out = damaged()
    (pk, sk, ek), (pv, sv, ev) = locate(out, K0), locate(out, V0)
    assert ek["shape"] == ev["shape"] and ek["dtype"] == ev["dtype"]
    k, v = read_at(pk, sk, nbytes(ek)), read_at(pv, sv, nbytes(ev))
    write_at(pk, sk, v)
    write_at(pv, sv, k)
    report = cases["untied"].verify(out)
    assert not report.ok and len(report.problems) == 2, report.problems
    assert any(K0 in p and "recomputed merge" in p for p in report.problems), report.problems
    assert any(V0 in p and "recomputed merge" in p for p in report.problems), report.problems


def test_swapped_copied_tensors(cases, damaged):
    out = damaged()
    (pe, se, ee), (ph, sh, eh) = locate(out, EMBED), locate(out, HEAD)
    e, h = read_at(pe, se, nbytes(ee)), read_at(ph, sh, nbytes(eh))
    write_at(pe, se, h)
    write_at(ph, sh, e)
    report = cases["untied"].verify(out)
    assert len(report.problems) == 2, report.problems
    assert any(EMBED in p and "not byte-identical" in p for p in report.problems)
    assert any(HEAD in p and "not byte-identical" in p for p in report.problems)


def test_base_tensor_where_a_merge_was_due(cases, damaged):
    out, base = damaged(), cases["untied"].base
    path, start, entry = locate(out, Q0)
    bpath, bstart, bentry = locate(base, Q0)
    assert entry["shape"] == bentry["shape"]
    write_at(path, start, read_at(bpath, bstart, nbytes(bentry)))
    only(cases["untied"].verify(out), Q0, "recomputed merge", "the LoRA delta was not applied")


def test_index_entry_removed(cases, damaged):
    out = damaged()
    shard = json.loads((out / INDEX).read_text())["weight_map"][GATE0]
    edit_json(out / INDEX, lambda index: index["weight_map"].pop(GATE0))
    only(cases["untied"].verify(out), str(out / INDEX), "weight_map lacks", GATE0, shard)


def test_index_total_size_wrong(cases, damaged):
    out = damaged()
    edit_json(out / INDEX, lambda index: index["metadata"].update(total_size=index["metadata"]["total_size"] + 2))
    only(cases["untied"].verify(out), str(out / INDEX), "total_size")


def test_shard_header_shape_edited(cases, damaged):
    out = damaged()
    path, _, entry = locate(out, GATE0)
    assert entry["shape"] == [128, 64]
    n, _ = read_header(path)
    raw = read_at(path, 8, n)
    old = f'"{GATE0}":{{"dtype":"BF16","shape":[128,64]'.encode()
    assert raw.count(old) == 1
    write_at(path, 8, raw.replace(old, old.replace(b"[128,64]", b"[64,128]")))
    only(cases["untied"].verify(out), str(path), GATE0, "shape [64, 128] (planned [128, 64])")


def test_truncated_shard(cases, damaged):
    out = damaged()
    path, _, _ = locate(out, GATE0)
    os.truncate(path, path.stat().st_size - 10)
    only(cases["untied"].verify(out), str(path), "truncated")


def test_config_vocab_size_changed(cases, damaged):
    out = damaged()
    edit_json(out / "config.json", {"vocab_size": 300})
    report = cases["untied"].verify(out)
    assert len(report.problems) == 3, report.problems
    assert any("config.json" in p and "vocab_size is 300" in p and EMBED in p for p in report.problems)
    assert any("config.json" in p and "vocab_size is 300" in p and HEAD in p for p in report.problems)
    assert any("config.json" in p and "differs from the base's" in p for p in report.problems)


def test_resized_vocab_config_reverted(cases, damaged):
    out = damaged("resized")
    assert json.loads((out / "config.json").read_text())["vocab_size"] == NEW_VOCAB
    edit_json(out / "config.json", {"vocab_size": VOCAB})
    report = cases["resized"].verify(out)
    assert any("vocab_size" in p and f"planned {NEW_VOCAB}" in p for p in report.problems), report.problems
    assert any(f"vocab_size is {VOCAB} but {EMBED} has {NEW_VOCAB} rows" in p for p in report.problems)
    assert any(f"vocab_size is {VOCAB} but {HEAD} has {NEW_VOCAB} rows" in p for p in report.problems)


def test_tie_flag_contradicts_tensors(cases, damaged):
    out = damaged("tied")
    edit_json(out / "config.json", {"tie_word_embeddings": True})
    report = cases["tied"].verify(out)
    assert len(report.problems) == 2, report.problems
    assert any("tie_word_embeddings" in p and "planned False" in p for p in report.problems)
    assert any(f"tie_word_embeddings is true but {HEAD}" in p and "not byte-identical" in p for p in report.problems)


def test_untied_flag_without_lm_head(cases, tmp_path):
    """A tied base merged with projection LoRAs only stays tied and stores no lm_head; a config that says
    untied then contradicts the tensors."""
    case = Case(cases["tied"].base, cases["untied"].adapter, tmp_path / "out", 8 << 20)
    merge_shards(case.base, case.adapter, case.out, progress=False)
    assert case.verify().ok
    edit_json(case.out / "config.json", {"tie_word_embeddings": False})
    report = case.verify()
    assert len(report.problems) == 2, report.problems
    assert any("differs from the base's" in p for p in report.problems)
    assert any(f"tie_word_embeddings is false but the checkpoint has no {HEAD}" in p for p in report.problems)


def test_side_files_missing_changed_or_extra(cases, damaged):
    out = damaged()
    (out / "generation_config.json").unlink()
    (out / "notes.txt").write_text("hello\n")
    report = cases["untied"].verify(out)
    assert len(report.problems) == 2, report.problems
    assert any("generation_config.json" in p and "missing" in p for p in report.problems)
    assert any("notes.txt" in p and "unexpected file" in p for p in report.problems)


def test_side_file_changed(cases, damaged):
    out = damaged()
    path = out / "generation_config.json"
    path.write_text(path.read_text().replace("1", "7"))
    only(cases["untied"].verify(out), str(path), "differs from the base's")


# -- sampling vs --full ---------------------------------------------------------------------------------


def test_full_catches_a_block_the_sample_skips(cases, damaged):
    out = damaged()
    path, start, entry = locate(out, Q0)
    rows, cols = entry["shape"]
    row_bytes = cols * 2
    assert rows // (BLOCK // (4 * cols)) == 8  # blocks 0..7; the sample compares 0, 4 and 7
    flip(path, start + 2 * 8 * row_bytes + 5)  # a byte in block 2 (rows 16..23)
    sampled = cases["untied"].verify(out)
    assert sampled.ok, sampled.problems
    only(cases["untied"].verify(out, full=True), Q0, "row 16")
    flip(path, start + 4 * 8 * row_bytes + 5)  # and one in the middle block, which the sample does check
    only(cases["untied"].verify(out), Q0, "row 32")


def test_sampled_blocks():
    assert verify_module.sampled_blocks(1, False) == {0}
    assert verify_module.sampled_blocks(2, False) == {0, 1}
    assert verify_module.sampled_blocks(8, False) == {0, 4, 7}
    assert verify_module.sampled_blocks(8, True) == set(range(8))


# -- user errors ----------------------------------------------------------------------------------------


def test_output_not_a_folder(cases, tmp_path):
    with pytest.raises(FormatError, match="not found"):
        cases["untied"].verify(tmp_path / "nowhere")
    (tmp_path / "file").write_text("x")
    with pytest.raises(FormatError, match="found a file"):
        cases["untied"].verify(tmp_path / "file")


# -- the command line -----------------------------------------------------------------------------------


@pytest.mark.slow  # verifies through the command line
def test_cli_exit_codes(cases, damaged, tmp_path):
    case = cases["tied"]
    proc = run_cli("verify", case.out, "--base", case.base, "--adapter", case.adapter, "--full", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "verify: OK" in proc.stdout and proc.stderr == ""

    out = damaged("tied")
    path, start, _ = locate(out, EMBED)  # merged with the embedding LoRA
    flip(path, start)
    edit_json(out / INDEX, lambda index: index["weight_map"].pop(NORM))
    proc = run_cli("verify", out, "--base", case.base, "--adapter", case.adapter, cwd=tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert any(EMBED in line and "recomputed merge" in line for line in lines), proc.stdout
    assert any(NORM in line and "weight_map lacks" in line for line in lines), proc.stdout
    assert lines[-1].startswith("verify: FAILED: 2 problem(s)"), proc.stdout

    proc = run_cli("verify", tmp_path / "nowhere", "--base", case.base, "--adapter", case.adapter, cwd=tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    expected = f"error: {tmp_path / 'nowhere'}: merged output folder not found"
    assert [line for line in proc.stderr.splitlines() if line] == [expected]
    proc = run_cli("verify", case.out, "--base", case.base, "--adapter", case.adapter, "--map", "oops", cwd=tmp_path)
    assert proc.returncode == 1 and proc.stderr.startswith("error: --map 'oops'"), proc.stderr
