"""A run owns what it starts: nothing it does outlives it or reaches into the caller's process.

* `iter_merged` pauses Python's garbage collector while it plans, not while the caller iterates;
* the background import of torch is joined when the run ends, a failed run included;
* the adapter hash started early belongs to the run (`inputs.digest.Hashes`), not to a module-level table;
* `iter_merged` and `merge_shards` are two sinks of the same stream: the tensors one yields are the bytes
  the other writes.
"""

from __future__ import annotations

import gc

import pytest
from builders import run_python
from safetensors import safe_open

from qwen_merge import iter_merged
from qwen_merge.run import open_run
from qwen_merge.sinks.base import Sink
from qwen_merge.sinks.folder import FolderSink
from qwen_merge.sinks.tensors import TensorSink


def test_iter_merged_leaves_the_caller_s_garbage_collector_on(demo_inputs):
    assert gc.isenabled()
    states = [gc.isenabled() for _ in iter_merged(*demo_inputs)]
    assert states and all(states), "the collector was off inside the caller's loop"
    assert gc.isenabled()


def test_the_collector_is_paused_while_planning_only(demo_inputs, monkeypatch):
    seen = []
    import qwen_merge.run as run_module

    real = run_module.make_plan

    def planning(*args, **kwargs):
        seen.append(gc.isenabled())
        return real(*args, **kwargs)

    monkeypatch.setattr(run_module, "make_plan", planning)
    with open_run(*demo_inputs, options=_options()) as run:
        assert gc.isenabled() and run.plan.merges
    assert seen == [False]


def test_a_failed_merge_leaves_no_thread_of_its_own(demo_inputs, tmp_path):
    """The import thread is joined and the adapter hash forgotten when the run ends, even by an error
    (here: the destination is refused after planning, when both have started). In a fresh interpreter,
    where torch is not yet imported, so the import thread does start."""
    out = tmp_path / "out"
    (out / "stray").mkdir(parents=True)
    code = ("import sys, threading; from qwen_merge import OutputError, merge_shards; from qwen_merge.inputs import digest\n"
            "try:\n    merge_shards(sys.argv[1], sys.argv[2], sys.argv[3], progress=False, resume=True)\n"
            "except OutputError:\n    pass\nelse:\n    raise SystemExit('the merge did not fail')\n"
            "assert 'torch' in sys.modules, 'the import thread did not run'\n"
            "assert not [t for t in threading.enumerate() if t.name == 'qwen-merge-import'], 'import thread alive'\n"
            "assert not hasattr(digest, '_hashing'), 'input hashes are the run\\'s, not the module\\'s'\n")
    done = run_python(code, *demo_inputs, out, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_each_run_has_its_own_hashes(demo_inputs):
    with open_run(*demo_inputs, options=_options(), merging=True) as first, \
            open_run(*demo_inputs, options=_options(), merging=True) as second:
        assert first._hashes is not second._hashes
        assert first.identity() == second.identity()


def test_the_two_sinks_give_the_same_tensors(demo_inputs, demo_merged):
    """`iter_merged` (TensorSink) yields, in checkpoint order, exactly the tensors `merge_shards`
    (FolderSink) wrote."""
    written = {}
    for shard in sorted(demo_merged.glob("*.safetensors")):
        with safe_open(shard, "pt") as f:
            written.update({name: f.get_tensor(name) for name in f.keys()})
    yielded = dict(iter_merged(*demo_inputs))
    assert yielded.keys() == written.keys()
    for name, tensor in yielded.items():
        assert tensor.dtype == written[name].dtype and tensor.view(-1).view(dtype=_bytes()).equal(
            written[name].view(-1).view(dtype=_bytes())), name


def test_both_sinks_implement_the_interface():
    for sink in (FolderSink, TensorSink):
        assert callable(getattr(sink, "done")) and callable(getattr(sink, "consume"))
    assert {"done", "consume"} <= set(dir(Sink))


def _options():
    from qwen_merge import MergeOptions

    return MergeOptions()


def _bytes():
    import torch

    return torch.uint8
