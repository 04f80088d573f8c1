"""Destination rules: OutputError for destinations that would clobber or nest inside an input, or that
already hold something (unless overwrite=True for a folder). Inputs are never modified and no temp
folder is left beside the destination.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from builders import checkpoint_tensors, copy_tree, tree_hash

from qwen_merge import OutputError, QwenMergeError, merge_shards, plan_merge


@pytest.fixture
def inputs(zoo, tmp_path):
    """Private copies of a real base and adapter (tests here may point the destination into them)."""
    return copy_tree(zoo.base("qwen_bf16"), tmp_path / "base"), copy_tree(zoo.adapter("basic"), tmp_path / "adapter")


def _listing(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


def _assert_refused(base, adapter, dest, *, overwrite, base_arg=None):
    parent = Path(os.path.abspath(dest)).parent
    while not parent.exists():  # nearest existing folder above the destination
        parent = parent.parent
    before = (tree_hash(base), tree_hash(adapter), _listing(parent))
    with pytest.raises(QwenMergeError) as info:
        merge_shards(base_arg or base, adapter, dest, overwrite=overwrite, progress=False)
    assert type(info.value) is OutputError, f"{type(info.value).__name__}: {info.value}"
    msg = str(info.value)
    assert msg.strip() and "\n" not in msg.strip(), repr(msg)
    assert (tree_hash(base), tree_hash(adapter), _listing(parent)) == before, "something was written or changed"
    return msg


@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize(
    "where", ["base", "inside_base", "adapter", "inside_adapter", "base_dotdot", "parent_of_base", "parent_of_adapter"]
)
def test_destination_overlapping_an_input(inputs, where, overwrite):
    base, adapter = inputs
    dest = {
        "base": base,
        "inside_base": base / "merged",
        "adapter": adapter,
        "inside_adapter": adapter / "merged",
        "base_dotdot": Path(f"{base}/../{base.name}"),
        # replacing a folder that holds an input would delete the input
        "parent_of_base": base.parent,
        "parent_of_adapter": adapter.parent,
    }[where]
    _assert_refused(base, adapter, dest, overwrite=overwrite)
    if where.startswith("inside"):
        assert not dest.exists()


def test_destination_nested_deeper_inside_base(inputs):
    base, adapter = inputs
    _assert_refused(base, adapter, base / "a" / "b", overwrite=True)
    assert not (base / "a").exists()


def test_destination_is_symlink_to_base(inputs, tmp_path):
    base, adapter = inputs
    link = tmp_path / "link_to_base"
    link.symlink_to(base, target_is_directory=True)
    _assert_refused(base, adapter, link, overwrite=False)
    assert link.is_symlink()


def test_destination_symlink_to_base_with_overwrite_never_touches_base(inputs, tmp_path):
    base, adapter = inputs
    link = tmp_path / "link_to_base"
    link.symlink_to(base, target_is_directory=True)
    before = tree_hash(base)
    try:
        merge_shards(base, adapter, link, overwrite=True, progress=False)
    except OutputError:
        pass
    assert tree_hash(base) == before


def test_destination_is_folder_of_single_file_base(zoo, tmp_path):
    base = copy_tree(zoo.base("qwen_bf16_single"), tmp_path / "base")
    adapter = copy_tree(zoo.adapter("basic_single"), tmp_path / "adapter")
    _assert_refused(base, adapter, base, overwrite=True, base_arg=base / "model.safetensors")


def test_non_empty_folder_without_overwrite(inputs, tmp_path):
    base, adapter = inputs
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "keep.txt").write_text("precious")
    _assert_refused(base, adapter, dest, overwrite=False)
    assert _listing(dest) == ["keep.txt"] and (dest / "keep.txt").read_text() == "precious"


@pytest.mark.parametrize("overwrite", [False, True])
def test_existing_regular_file(inputs, tmp_path, overwrite):
    base, adapter = inputs
    dest = tmp_path / "out"
    dest.write_text("not a folder")
    _assert_refused(base, adapter, dest, overwrite=overwrite)
    assert dest.read_text() == "not a folder"


def test_overwrite_replaces_non_empty_folder(inputs, tmp_path):
    base, adapter = inputs
    reference = tmp_path / "reference"
    merge_shards(base, adapter, reference, progress=False)

    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "stale.txt").write_text("old")
    (dest / "model-00001-of-00099.safetensors").write_bytes(b"junk")
    (dest / "sub").mkdir()
    before = (tree_hash(base), tree_hash(adapter))
    report = merge_shards(base, adapter, dest, overwrite=True, progress=False)
    assert (tree_hash(base), tree_hash(adapter)) == before
    assert Path(report.output).resolve() == dest.resolve()
    assert tree_hash(dest) == tree_hash(reference), "overwritten folder differs from a fresh merge"
    assert sorted(os.listdir(tmp_path)) == ["adapter", "base", "out", "reference"], "leftovers beside destination"


def test_empty_existing_folder_is_fine(inputs, tmp_path):
    base, adapter = inputs
    dest = tmp_path / "out"
    dest.mkdir()
    merge_shards(base, adapter, dest, progress=False)
    assert checkpoint_tensors(dest).keys() == checkpoint_tensors(base).keys()
    assert sorted(os.listdir(tmp_path)) == ["adapter", "base", "out"]


def test_fresh_destination_and_determinism(inputs, tmp_path):
    """Two merges of the same inputs give identical folders, with nothing left beside them."""
    base, adapter = inputs
    merge_shards(base, adapter, tmp_path / "one", progress=False)
    merge_shards(base, adapter, tmp_path / "two", progress=False)
    assert tree_hash(tmp_path / "one") == tree_hash(tmp_path / "two")
    assert sorted(os.listdir(tmp_path)) == ["adapter", "base", "one", "two"]


def test_plan_writes_nothing(inputs, tmp_path):
    base, adapter = inputs
    before = (tree_hash(base), tree_hash(adapter), _listing(tmp_path))
    plan_merge(base, adapter)
    assert (tree_hash(base), tree_hash(adapter), _listing(tmp_path)) == before
