"""The records qwen-merge writes and reads back: the manifest (`qwen_merge.json`) and a partial folder's
resume state (`qwen_merge.partial.json`).

* Each is a frozen dataclass with one `to_json` and one `from_json`: reading what a merge of the demo model
  wrote and writing it again gives the same bytes, and the document keeps its layout (checked field by
  field against the inputs and the output, not against the code that writes it).
* A record edited by hand or damaged is one error line naming the file and the field (a FormatError from
  Python), never a traceback, wherever it is read: `merge --resume`, a base's manifest, `verify`, a resume
  state. A record that lacks fields (another version's) compares as different and names what differs.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
from builders import file_sha256, one_error_line, run_cli, tree_hash

import qwen_merge.sinks.resume
from qwen_merge import FormatError, OutputError, merge_shards, plan_merge, verify_merge
from qwen_merge.cli import main
from qwen_merge.files import ADAPTER_CONFIG, ADAPTER_WEIGHTS, INDEX_NAME, MANIFEST_NAME, STATE_NAME, json_bytes
from qwen_merge.planning.manifest import (AdapterRecord, BaseRecord, HubRecord, Manifest, MergeIdentity, ShardRecord,
                                          identity, manifest, previous_adapters)
from qwen_merge.planning.tokenizer import TokenizerRecord
from qwen_merge.sinks.output import partial_folder_of
from qwen_merge.sinks.resume import ResumeRecord
from qwen_merge.version import VERSION

DEMO_OPTIONS = {"allow_nonfinite": False, "block_bytes": 8 << 20, "dtype": None, "key_map": {}, "max_shard_size": None,
                "rounding": "single", "tokenizer": "auto"}


def one_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    return err.strip()


def edited(path: Path, edit) -> Path:
    """Rewrite the JSON file at `path` with `edit(document)` applied."""
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))
    return path


def set_field(*keys: str, value: object):
    def edit(doc: dict) -> None:
        for key in keys[:-1]:
            doc = doc[key]
        doc[keys[-1]] = value
    return edit


def paths_in(doc: object, prefix: tuple = ()) -> list[tuple]:
    """The key path of every value in a JSON document."""
    if not isinstance(doc, dict):
        return [prefix] if prefix else []
    return ([prefix] if prefix else []) + [p for key, value in doc.items() for p in paths_in(value, (*prefix, key))]


@pytest.fixture(scope="module")
def interrupted(demo_inputs, tmp_path_factory) -> Path:
    """A partial folder whose state records every shard done: the demo merge stopped (Ctrl-C) just before
    removing its state and publishing. Read-only: copy before editing."""
    dest = tmp_path_factory.mktemp("interrupted") / "out"

    def stopped(self):
        raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(qwen_merge.sinks.resume.ResumeState, "remove", stopped)
        with pytest.raises(KeyboardInterrupt):
            merge_shards(*demo_inputs, dest, progress=False)
    assert not dest.exists() and (partial_folder_of(dest) / STATE_NAME).is_file()
    return partial_folder_of(dest)


def place(partial: Path, dest: Path) -> Path:
    """A copy of `partial` beside `dest`, where a `--resume` into dest finds it."""
    return Path(shutil.copytree(partial, partial_folder_of(dest)))


# -- the layout and the round trip ------------------------------------------------------------------------

def test_the_manifest_reads_back_to_the_same_bytes_and_keeps_its_layout(demo_inputs, demo_merged):
    base, adapter = demo_inputs
    path = demo_merged / MANIFEST_NAME
    written = path.read_bytes()
    doc = json.loads(written)
    shards = sorted(p.name for p in base.glob("*.safetensors"))
    assert doc == {
        "tool": "qwen-merge", "version": VERSION,
        "base": {"files": {p.name: p.stat().st_size for p in base.iterdir() if p.name != INDEX_NAME},
                 "merged_adapters": []},
        "adapter": {"weights_sha256": file_sha256(adapter / ADAPTER_WEIGHTS),
                    "weights_size": (adapter / ADAPTER_WEIGHTS).stat().st_size,
                    "config_sha256": file_sha256(adapter / ADAPTER_CONFIG)},
        "options": DEMO_OPTIONS,
        "counts": {"merged": 28, "other_ops": 0, "copied": 19},
        "output": {"shards": {name: {"sha256": file_sha256(demo_merged / name),
                                     "size": (demo_merged / name).stat().st_size} for name in shards},
                   "tie": None, "renames": []},
    }
    found = Manifest.from_json(doc, path)
    assert Manifest.from_json(found.to_json(), path) == found
    assert json_bytes(found.to_json(), sort_keys=True) == written
    plan = plan_merge(base, adapter)  # the record a merge builds is the one read back
    assert manifest(identity(plan), plan, found.shards) == found


def test_the_resume_state_reads_back_to_the_same_bytes_and_keeps_its_layout(demo_inputs, demo_merged, interrupted,
                                                                            tmp_path):
    base, adapter = demo_inputs
    path = interrupted / STATE_NAME
    written = path.read_bytes()
    doc = json.loads(written)
    recorded = json.loads((demo_merged / MANIFEST_NAME).read_text())
    stats = {p.name: [(st := p.stat()).st_size, st.st_mtime_ns, st.st_ino] for p in base.iterdir()
             if p.name != INDEX_NAME}
    assert doc == {"identity": {**{k: v for k, v in recorded.items() if k not in ("counts", "output")},
                                "base_files": stats},
                   "done": recorded["output"]["shards"]}
    found = ResumeRecord.from_json(doc, path)
    assert ResumeRecord.from_json(found.to_json(), path) == found
    assert json_bytes(found.to_json(), sort_keys=True) == written
    # and resuming from it finishes the merge: the folder a merge without the interruption writes
    dest = tmp_path / "out"
    place(interrupted, dest)
    assert main(["merge", str(base), str(adapter), str(dest), "--resume", "--quiet"]) == 0
    assert tree_hash(dest) == tree_hash(demo_merged) and not partial_folder_of(dest).exists()


def test_the_optional_parts_round_trip(tmp_path):
    """Hub origins, the tokenizer taken, a tie decision and renames: parts the demo's manifest has none of."""
    path = tmp_path / MANIFEST_NAME
    ident = MergeIdentity("qwen-merge", VERSION,
                          BaseRecord({"model.safetensors": 10}, ("ab" * 32,), HubRecord("org/base", "c" * 40)),
                          AdapterRecord("ef" * 32, 5, "01" * 32, HubRecord("org/lora", "d" * 40)),
                          DEMO_OPTIONS | {"tokenizer": "folder", "key_map": {"a.": "b."}},
                          TokenizerRecord("folder", {"tokenizer.json": "23" * 32}))
    full = Manifest(ident, 2, 1, 3, {"model.safetensors": ShardRecord("45" * 32, 10)}, "kept tied: a and b",
                    (("base_model.model.", ""),))
    assert Manifest.from_json(json.loads(json_bytes(full.to_json())), path) == full
    doc = full.to_json()
    assert (doc["base"]["hub"], doc["tokenizer"], doc["output"]["renames"]) == (
        {"repo": "org/base", "commit": "c" * 40}, {"source": "folder", "files": {"tokenizer.json": "23" * 32}},
        [["base_model.model.", ""]])
    state = ResumeRecord(ident, {"model.safetensors": (10, 123, 456)}, full.shards)
    assert ResumeRecord.from_json(json.loads(json_bytes(state.to_json())), tmp_path / STATE_NAME) == state


def test_a_record_that_lacks_fields_reads_as_not_recording_them(tmp_path):
    path = tmp_path / MANIFEST_NAME
    empty = Manifest.from_json({}, path)
    assert (empty.identity.version, empty.identity.options, empty.identity.base.merged_adapters, empty.shards,
            empty.renames) == (None, None, None, {}, ())
    assert Manifest.from_json(empty.to_json(), path) == empty
    state = ResumeRecord.from_json({"identity": {"version": VERSION}}, tmp_path / STATE_NAME)
    assert state.identity.version == VERSION and state.base_files == {} and state.done == {}


# -- damaged or hand-edited records -----------------------------------------------------------------------

@pytest.mark.parametrize(("keys", "value", "field", "expected"), [
    (("adapter", "weights_size"), "big", "adapter.weights_size", 'an integer, found "big"'),
    (("base", "merged_adapters"), "abc", "base.merged_adapters", 'a list of strings, found "abc"'),
    (("base", "files", "config.json"), True, "base.files", "an object of sizes (integers), found"),
    (("options",), [1], "options", "an object, found [1]"),
    (("tokenizer",), {"source": "adapter", "files": {"vocab.json": 7}}, "tokenizer.files", "SHA-256 strings"),
    (("output", "shards", "model-00002-of-00003.safetensors", "size"), "1", 
     'output.shards["model-00002-of-00003.safetensors"].size', 'an integer, found "1"'),
    (("output", "renames"), [["a"]], "output.renames", "pairs of strings"),
])
def test_a_damaged_manifest_is_one_error_naming_the_file_and_field(demo_inputs, demo_merged, capsys, tmp_path,
                                                                   keys, value, field, expected):
    """`merge --resume` into a finished merge reads its manifest."""
    base, adapter = demo_inputs
    out = Path(shutil.copytree(demo_merged, tmp_path / "out"))
    path = edited(out / MANIFEST_NAME, set_field(*keys, value=value))
    before = tree_hash(out)
    with pytest.raises(FormatError) as info:
        merge_shards(base, adapter, out, progress=False, resume=True)
    assert str(info.value).startswith(f"{path}: field {field} must be ") and expected in str(info.value), info.value
    assert main(["merge", str(base), str(adapter), str(out), "--resume"]) == 1
    assert one_error(capsys) == f"error: {info.value}"
    assert tree_hash(out) == before


def test_every_field_of_the_wrong_kind_is_a_format_error_never_a_traceback(demo_merged, interrupted):
    """Every value of both records, replaced by each JSON kind in turn: read, or one FormatError naming the
    file and a field on the way to the value replaced."""
    for path, parse in ((demo_merged / MANIFEST_NAME, Manifest.from_json),
                        (interrupted / STATE_NAME, ResumeRecord.from_json)):
        doc = json.loads(path.read_text())
        for keys in paths_in(doc):
            for value in ([], "x", 1.5, True, {}, [1, "a"], {"a": [2]}):
                damaged = copy.deepcopy(doc)
                set_field(*keys, value=value)(damaged)
                try:
                    parse(damaged, path)
                except FormatError as e:
                    message = str(e)
                    assert message.startswith(f"{path}: field ") and "\n" not in message, message
                    named = message.removeprefix(f"{path}: field ").split(" must be ")[0]
                    assert named.split(".")[0].split("[")[0] == keys[0], (keys, message)


def test_a_damaged_manifest_in_the_base_is_one_error_naming_it(demo_inputs, demo_merged, tmp_path):
    """A base merged by qwen-merge: its manifest tells which adapters it holds."""
    _, adapter = demo_inputs
    base = Path(shutil.copytree(demo_merged, tmp_path / "base"))
    path = edited(base / MANIFEST_NAME, set_field("adapter", "weights_sha256", value=12))
    with pytest.raises(FormatError, match=r"field adapter\.weights_sha256 must be a string, found 12"):
        plan_merge(base, adapter)
    line = one_error_line(run_cli("plan", base, adapter, cwd=tmp_path))
    assert line.startswith(f"error: {path}: field adapter.weights_sha256 must be a string"), line


def test_a_manifest_from_another_version_names_what_differs(demo_inputs, demo_merged, tmp_path):
    """Fields it lacks read as not recorded: resuming into it names the differences, and a base holding it
    still refuses the adapter it records."""
    base, adapter = demo_inputs
    out = Path(shutil.copytree(demo_merged, tmp_path / "out"))
    recorded = json.loads((out / MANIFEST_NAME).read_text())
    (out / MANIFEST_NAME).write_text(json.dumps({"tool": "qwen-merge", "version": "0.0.9",
                                                 "adapter": {"weights_sha256": recorded["adapter"]["weights_sha256"]}}))
    with pytest.raises(OutputError) as info:
        merge_shards(base, adapter, out, progress=False, resume=True)
    assert f"qwen-merge version changed: '0.0.9' -> '{VERSION}'" in str(info.value), info.value
    assert "option rounding changed: None -> 'single'" in str(info.value), info.value
    assert previous_adapters(out) == (recorded["adapter"]["weights_sha256"],)


def test_verify_names_a_damaged_manifest_field_as_a_problem(demo_inputs, demo_merged, tmp_path):
    out = Path(shutil.copytree(demo_merged, tmp_path / "out"))
    edited(out / MANIFEST_NAME, set_field("counts", "merged", value="28"))
    report = verify_merge(out, *demo_inputs)
    assert not report.ok and len(report.problems) == 1, report.problems
    assert "the options of the merge cannot be read" in report.problems[0]
    assert 'field counts.merged must be an integer, found "28"' in report.problems[0], report.problems


def test_a_damaged_resume_state_is_one_error_and_keeps_the_work(demo_inputs, interrupted, capsys, tmp_path):
    base, adapter = demo_inputs
    dest = tmp_path / "out"
    partial = place(interrupted, dest)
    path = edited(partial / STATE_NAME, set_field("done", "model-00001-of-00003.safetensors", value=[174064]))
    before = tree_hash(partial)
    assert main(["merge", str(base), str(adapter), str(dest), "--resume"]) == 1
    line = one_error(capsys)
    assert line == (f'error: {path}: field done["model-00001-of-00003.safetensors"] must be an object, found '
                    f'[174064]; the file was edited or damaged: restore it as qwen-merge wrote it, or remove it'), line
    assert tree_hash(partial) == before and not dest.exists()


def test_a_resume_state_without_base_file_stats_names_the_base_files(demo_inputs, interrupted, tmp_path):
    """A state from a version that recorded no mtime and inode: every base file reads as changed, and the
    message stays one line (a few named, the rest counted)."""
    base, adapter = demo_inputs
    dest = tmp_path / "out"
    partial = place(interrupted, dest)
    edited(partial / STATE_NAME, lambda doc: doc["identity"].pop("base_files"))
    with pytest.raises(OutputError) as info:
        merge_shards(base, adapter, dest, progress=False, resume=True)
    message = str(info.value)
    assert message.startswith(f"{partial}: cannot resume") and "\n" not in message, message
    assert "base file config.json changed (mtime, inode)" in message and "4 more base files differ" in message
