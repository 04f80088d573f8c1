"""Local inputs given the wrong way get a one-line hint; the right ones are still accepted.

* BASE and ADAPTER swapped (an adapter folder or file as BASE, a model folder as ADAPTER): "look swapped".
* One shard of a sharded model as BASE: pass the folder, named. A whole model as a file is accepted, also
  beside an index that does not list it with other shards.
* A trainer's output folder as ADAPTER: its checkpoint-<step>/ adapters, by step, and the last one's path.
* A single .safetensors file as BASE: the side files beside it are copied as a folder's are (never other
  weights or indexes), so transformers loads the output.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from builders import (ADAPTER_CFG, ADAPTER_ST, INDEX, copy_tree, load_base_model, logits, one_error_line, random_ids,
                      run_cli)
from safetensors.torch import load_file, save_file

from qwen_merge import merge_shards, plan_merge, verify_merge
from qwen_merge.errors import AdapterError, FormatError, QwenMergeError

SHARD = "model-00002-of-00003.safetensors"  # one of the demo base's three shards


def message(exc: type[QwenMergeError], base: Path, adapter: Path) -> str:
    """The one-line message plan_merge(base, adapter) raises, of class `exc`."""
    with pytest.raises(exc) as info:
        plan_merge(base, adapter)
    text = str(info.value)
    assert "\n" not in text, text
    return text


def trainer_folder(root: Path, adapter: Path, steps: list[int]) -> Path:
    """A Trainer output_dir: checkpoint-<step>/ adapter folders, the last one complete (the others only need
    their adapter_config.json here), plus the trainer's own files and a checkpoint without an adapter."""
    run = root / "run"
    for step in steps:
        folder = run / f"checkpoint-{step}"
        if step == max(steps):
            copy_tree(adapter, folder)
        else:
            folder.mkdir(parents=True)
            shutil.copyfile(adapter / ADAPTER_CFG, folder / ADAPTER_CFG)
    (run / "checkpoint-1").mkdir()  # a full fine-tune's checkpoint (no adapter): not listed
    (run / "trainer_state.json").write_text("{}")
    (run / "runs").mkdir()
    return run


# ------------------------------------------------------------------------------------ 1. swapped

@pytest.mark.parametrize("given", ["folder", ADAPTER_ST, ADAPTER_CFG])
def test_adapter_given_as_base_says_swapped(demo_inputs, given):
    base, adapter = demo_inputs
    text = message(FormatError, adapter if given == "folder" else adapter / given, base)
    assert text.startswith(f"{adapter}: ") and "look swapped" in text and "BASE ADAPTER" in text, text
    assert ADAPTER_CFG in text, text


def test_model_folder_given_as_adapter_says_swapped(demo_inputs):
    base, _ = demo_inputs
    text = message(AdapterError, base, base)
    assert text.startswith(f"{base}: ") and "look swapped" in text and "BASE ADAPTER" in text, text


def test_model_folder_holding_an_adapter_is_still_a_model(demo_inputs, tmp_path):
    """Never refuse something valid: a model folder that also carries adapter files plans as before."""
    base, adapter = demo_inputs
    both = copy_tree(base, tmp_path / "base")
    for name in (ADAPTER_CFG, ADAPTER_ST):
        shutil.copyfile(adapter / name, both / name)
    plan = plan_merge(both, adapter)
    assert plan.merges and ADAPTER_ST in plan.base.skipped


def test_adapter_without_its_config_is_not_called_a_model(demo_inputs, tmp_path):
    """An adapter folder holding a copy of the model's config.json but no adapter_config.json: the plain
    missing-config message, not "swapped" (its only weights are the adapter's)."""
    base, adapter = demo_inputs
    bad = tmp_path / "adapter"
    bad.mkdir()
    shutil.copyfile(adapter / ADAPTER_ST, bad / ADAPTER_ST)
    shutil.copyfile(base / "config.json", bad / "config.json")
    text = message(AdapterError, base, bad)
    assert f"{ADAPTER_CFG} is missing" in text and "swapped" not in text, text


# ------------------------------------------------------------------------------------ 2. one shard

def test_one_shard_as_base_names_the_folder(demo_inputs):
    base, adapter = demo_inputs
    text = message(FormatError, base / SHARD, adapter)
    assert text.startswith(f"{base / SHARD}: ") and f"pass the model folder {base} as BASE" in text, text
    assert INDEX in text and "3 shards" in text, text


def test_whole_model_files_beside_an_index_are_accepted(demo_inputs, tmp_path):
    """A consolidated copy the index does not list, and a single file the index lists alone, are whole."""
    base, adapter = demo_inputs
    folder = copy_tree(base, tmp_path / "base")
    whole = {k: v for shard in sorted(base.glob("*.safetensors")) for k, v in load_file(shard).items()}
    save_file(whole, folder / "consolidated.safetensors", metadata={"format": "pt"})
    plan = plan_merge(folder / "consolidated.safetensors", adapter)
    assert [s.path.name for s in plan.base.shards] == ["consolidated.safetensors"] and plan.merges
    assert INDEX in plan.base.skipped and SHARD in plan.base.skipped  # never copied beside the merged file

    alone = tmp_path / "alone"
    alone.mkdir()
    save_file(whole, alone / "model.safetensors", metadata={"format": "pt"})
    (alone / INDEX).write_text(json.dumps({"weight_map": dict.fromkeys(whole, "model.safetensors")}))
    assert plan_merge(alone / "model.safetensors", adapter).merges


# ------------------------------------------------------------------------------------ 3. trainer output

def test_trainer_folder_lists_its_checkpoints_by_step(demo_inputs, tmp_path):
    base, adapter = demo_inputs
    run = trainer_folder(tmp_path, adapter, [1000, 500, 1500])
    text = message(AdapterError, base, run)
    assert text.startswith(f"{run}: ") and ADAPTER_CFG in text, text
    assert "3 trainer checkpoint" in text and "(checkpoint-500, checkpoint-1000, checkpoint-1500)" in text, text
    assert text.endswith(f"e.g. the last: {run / 'checkpoint-1500'}"), text
    assert plan_merge(base, run / "checkpoint-1500").merges  # the hint's path is a working ADAPTER


def test_trainer_folder_with_many_checkpoints_stays_one_short_line(demo_inputs, tmp_path):
    base, adapter = demo_inputs
    run = trainer_folder(tmp_path, adapter, [100, 200, 300, 400, 500, 600, 700, 1000])
    text = message(AdapterError, base, run)
    assert "8 trainer checkpoint" in text, text
    assert "(checkpoint-100, checkpoint-200, ..., checkpoint-700, checkpoint-1000)" in text, text
    assert "checkpoint-400" not in text and text.endswith(str(run / "checkpoint-1000")), text


# ------------------------------------------------------------------------------------ the command line

@pytest.mark.parametrize("case", ["adapter_as_base", "model_as_adapter", "one_shard", "trainer_folder"])
def test_hints_on_the_command_line(demo_inputs, tmp_path, case):
    base, adapter = demo_inputs
    args, needle = {
        "adapter_as_base": ((adapter, base), "look swapped"),
        "model_as_adapter": ((base, base), "look swapped"),
        "one_shard": ((base / SHARD, adapter), f"pass the model folder {base} as BASE"),
        "trainer_folder": ((base, trainer_folder(tmp_path, adapter, [500, 1000])), "checkpoint-1000"),
    }[case]
    out = tmp_path / "out"
    assert needle in one_error_line(run_cli("merge", *args, out, cwd=tmp_path))
    assert not out.exists()


# ------------------------------------------------------------------------------------ 4. a file as BASE

def test_single_file_base_copies_the_side_files_and_loads(zoo, tmp_path):
    """Merging model.safetensors given as a file writes what merging its folder writes (config, generation
    config, tokenizer files), never the other weights, indexes or manifest beside it; transformers loads it."""
    folder_base, adapter = zoo.pair("basic_single")
    base = copy_tree(folder_base, tmp_path / "base")
    junk = {"pytorch_model.bin": b"stale", "other.safetensors": (base / "model.safetensors").read_bytes(),
            "pytorch_model.bin.index.json": b'{"weight_map": {}}',
            "qwen_merge.json": b'{"adapter": {"weights_sha256": "00"}}'}
    for name, data in junk.items():
        (base / name).write_bytes(data)
    (base / "subfolder").mkdir()

    out = tmp_path / "out"
    merge_shards(base / "model.safetensors", adapter, out, progress=False)
    by_folder = zoo.merged("basic_single").out
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(p.name for p in by_folder.iterdir()), names
    assert {"config.json", "generation_config.json", "tokenizer_config.json"} <= set(names), names
    for name in names:
        if name != "qwen_merge.json":  # it records the inputs, which differ by the files added above
            assert (out / name).read_bytes() == (by_folder / name).read_bytes(), name
    assert verify_merge(out, base / "model.safetensors", adapter).ok

    ids = random_ids(256)
    assert logits(load_base_model(out), ids).equal(logits(load_base_model(by_folder), ids))
