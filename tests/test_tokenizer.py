"""The tokenizer of the merged model: the adapter's when it differs from the base's in substance (added
tokens, chat template, ...), the base's bytes when it only differs in formatting, or what the option says.

The tokenizers are real (`tokenizers` BPE saved by transformers), the adapters real PEFT ones, and every
output is loaded with transformers' AutoTokenizer and checked with `verify`, through Python and the CLI.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from builders import NEW_TOKENS, VOCAB, build_added_tokens_adapter, build_tokenizer, copy_tree
from builders import in_process_cli as cli
from builders import in_process_error_line as error_line
from builders import run_cli
from hubserver import FakeHub, use_hub

from qwen_merge import OptionError, OutputError, merge_shards, plan_merge, verify_merge
from qwen_merge.planning.tokenizer import TOKENIZER_FILES, differences, facts, files_in
from qwen_merge.report import render

OTHER_TEMPLATE = "{% for m in messages %}[{{ m['role'] | upper }}] {{ m['content'] }}\n{% endfor %}[ASSISTANT]"
MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def tok(arts, tmp_path_factory) -> SimpleNamespace:
    """A base with a real tokenizer; adapters beside it: one that adds tokens (resized vocabulary), one
    whose tokenizer only has another chat template, one whose tokenizer is the base's re-serialized, and
    a folder holding another tokenizer."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("tokenizer")
    base = copy_tree(arts.base("untied"), root / "untied")  # the folder name the "plain" adapter's config names
    build_tokenizer(base)
    added = build_added_tokens_adapter(base, root / "added", seed=301)
    template = copy_tree(arts.adapter("plain"), root / "template")
    chat = AutoTokenizer.from_pretrained(base)
    chat.chat_template = OTHER_TEMPLATE
    chat.save_pretrained(template)
    reserialized = copy_tree(arts.adapter("plain"), root / "reserialized")
    AutoTokenizer.from_pretrained(base).save_pretrained(reserialized)
    _reformat(reserialized / "tokenizer.json")
    folder = root / "other-tokenizer"
    chat.save_pretrained(folder)
    return SimpleNamespace(base=base, added=added, template=template, reserialized=reserialized, folder=folder,
                           plain=arts.adapter("plain"))


def _reformat(path: Path) -> None:
    """What another tokenizers version writes for the same tokenizer: other indentation, merges as "a b"."""
    data = json.loads(path.read_text())
    data["model"]["merges"] = [" ".join(m) for m in data["model"]["merges"]]
    path.write_text(json.dumps(data, indent=4, ensure_ascii=False))


def tokenizer_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in files_in(folder)}


def output_files(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


# -- (a) a resized vocabulary: the added tokens encode to the new ids through AutoTokenizer on the output -----

def test_added_tokens_give_the_output_the_adapters_tokenizer(tok, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    plan = plan_merge(tok.base, tok.added)
    assert plan.tokenizer.source == "adapter"
    assert str(plan.tokenizer) == "adapter's (adds 4 tokens: <tool>, </tool>, <think>, </think>)"
    assert "tokenizer: adapter's (adds 4 tokens: <tool>, </tool>, <think>, </think>)" in render(plan)
    out = tmp_path / "out"
    report = merge_shards(tok.base, tok.added, out, progress=False)
    assert tokenizer_bytes(out) == tokenizer_bytes(tok.added) != tokenizer_bytes(tok.base)
    assert report.bytes_written == plan.output_bytes  # the manifest names the tokenizer files: sized exactly
    tokenizer = AutoTokenizer.from_pretrained(out)
    for i, token in enumerate(NEW_TOKENS):
        assert tokenizer.encode(token, add_special_tokens=False) == [VOCAB + i]
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer) == VOCAB + len(NEW_TOKENS)
    ids = torch.tensor([tokenizer.encode("<think> kaba </think>", add_special_tokens=False)])
    assert ids.max() == VOCAB + 3 and torch.isfinite(model(ids).logits).all()
    report = verify_merge(out, tok.base, tok.added, full=True)
    assert report.ok, report.problems
    manifest = json.loads((out / "qwen_merge.json").read_text())
    assert manifest["options"]["tokenizer"] == "auto"
    assert manifest["tokenizer"]["source"] == "adapter"
    assert set(manifest["tokenizer"]["files"]) == set(tokenizer_bytes(tok.added))


def test_added_tokens_through_the_cli(tok, tmp_path, capsys):
    planned = cli(capsys, "plan", tok.base, tok.added)
    assert planned.returncode == 0, planned.stderr
    assert "tokenizer: adapter's (adds 4 tokens: <tool>, </tool>, <think>, </think>)" in planned.stdout
    out = tmp_path / "out"
    merged = run_cli("merge", tok.base, tok.added, out)  # a real process: what a user sees on stderr
    assert merged.returncode == 0, merged.stderr
    assert merged.stderr.startswith("tokenizer: adapter's (adds 4 tokens")  # said before the merge starts
    assert tokenizer_bytes(out) == tokenizer_bytes(tok.added)
    checked = cli(capsys, "verify", out, "--base", tok.base, "--adapter", tok.added)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    quiet = cli(capsys, "merge", tok.base, tok.added, tmp_path / "quiet", "--quiet")
    assert quiet.returncode == 0 and quiet.stderr == "" and quiet.stdout == ""


# -- (b) a chat-template-only change ---------------------------------------------------------------------

def test_a_new_chat_template_is_taken_from_the_adapter(tok, tmp_path, capsys):
    from transformers import AutoTokenizer

    planned = cli(capsys, "plan", tok.base, tok.template)
    assert planned.returncode == 0, planned.stderr
    assert "tokenizer: adapter's (chat template differs)" in planned.stdout
    out = tmp_path / "out"
    merged = cli(capsys, "merge", tok.base, tok.template, out, "--quiet")
    assert merged.returncode == 0, merged.stderr
    assert (out / "chat_template.jinja").read_text() == OTHER_TEMPLATE
    rendered = AutoTokenizer.from_pretrained(out).apply_chat_template(MESSAGES, tokenize=False)
    assert rendered == "[USER] hi\n[ASSISTANT]"
    checked = cli(capsys, "verify", out, "--base", tok.base, "--adapter", tok.template)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    python = merge_shards(tok.base, tok.template, tmp_path / "python", progress=False)
    assert python.plan.tokenizer.reason == "chat template differs"
    assert tokenizer_bytes(tmp_path / "python") == tokenizer_bytes(out)


# -- (c) the same tokenizer, re-serialized: the base's bytes stay -----------------------------------------

def test_a_reserialized_tokenizer_keeps_the_base_bytes(tok, tmp_path, capsys):
    assert tokenizer_bytes(tok.reserialized)["tokenizer.json"] != tokenizer_bytes(tok.base)["tokenizer.json"]
    assert tokenizer_bytes(tok.reserialized)["tokenizer_config.json"] != tokenizer_bytes(tok.base)["tokenizer_config.json"]
    plan = plan_merge(tok.base, tok.reserialized)
    assert str(plan.tokenizer) == "base's (the adapter's files differ only in formatting)"
    merge_shards(tok.base, tok.reserialized, tmp_path / "python", progress=False)
    assert tokenizer_bytes(tmp_path / "python") == tokenizer_bytes(tok.base)
    assert verify_merge(tmp_path / "python", tok.base, tok.reserialized).ok
    merged = cli(capsys, "merge", tok.base, tok.reserialized, tmp_path / "cli", "--quiet")
    assert merged.returncode == 0, merged.stderr
    assert tokenizer_bytes(tmp_path / "cli") == tokenizer_bytes(tok.base)
    planned = cli(capsys, "plan", tok.base, tok.reserialized)
    assert "tokenizer: base's (the adapter's files differ only in formatting)" in planned.stdout


def test_what_counts_as_formatting(tok, tmp_path):
    """Merges as "a b" or pairs, the chat template in tokenizer_config.json or its own file, special tokens
    in special_tokens_map.json or tokenizer_config.json, AddedToken dicts or strings: the same tokenizer."""
    base = facts(files_in(tok.base))
    other = copy_tree(tok.base, tmp_path / "v4")
    config = json.loads((other / "tokenizer_config.json").read_text())
    config["chat_template"] = (other / "chat_template.jinja").read_text()
    eos = config.pop("eos_token")
    config["model_max_length"] = 4096
    (other / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    (other / "special_tokens_map.json").write_text(json.dumps({"eos_token": {"content": eos, "lstrip": False}}))
    (other / "chat_template.jinja").unlink()
    _reformat(other / "tokenizer.json")
    assert differences(base, facts(files_in(other))) == []
    config["eos_token"] = "<unk>"
    config["chat_template"] = OTHER_TEMPLATE
    (other / "tokenizer_config.json").write_text(json.dumps(config))
    (other / "special_tokens_map.json").unlink()
    assert differences(base, facts(files_in(other))) == ["special tokens differ: eos_token", "chat template differs"]


def test_an_adapter_without_tokenizer_files_keeps_the_base_tokenizer(tok, tmp_path):
    plan = plan_merge(tok.base, tok.plain)
    assert str(plan.tokenizer) == "base's (the adapter has no tokenizer files)"
    assert "tokenizer: base's (the adapter has no tokenizer files)" in render(plan)
    partial = copy_tree(tok.plain, tmp_path / "partial")
    shutil.copy(tok.template / "chat_template.jinja", partial)
    plan = plan_merge(tok.base, partial)
    assert plan.tokenizer.source == "base" and "hold no vocabulary" in plan.tokenizer.reason


# -- (d) the option: base, adapter, a folder --------------------------------------------------------------

def test_tokenizer_option_in_python(tok, tmp_path):
    out = tmp_path / "base"
    report = merge_shards(tok.base, tok.added, out, progress=False, tokenizer="base")
    assert str(report.plan.tokenizer) == "base's (chosen with the tokenizer option)"
    assert tokenizer_bytes(out) == tokenizer_bytes(tok.base)
    assert verify_merge(out, tok.base, tok.added, tokenizer="base").ok
    assert verify_merge(out, tok.base, tok.added).ok  # the choice recorded in the manifest is the default
    with pytest.raises(OptionError, match="tokenizer: 'auto' given, but .* records 'base'"):
        verify_merge(out, tok.base, tok.added, tokenizer="auto")
    folder = tmp_path / "folder"
    report = merge_shards(tok.base, tok.plain, folder, progress=False, tokenizer=tok.folder)
    assert report.plan.tokenizer.source == "folder"
    assert tokenizer_bytes(folder) == tokenizer_bytes(tok.folder)
    assert verify_merge(folder, tok.base, tok.plain, tokenizer=tok.folder).ok
    with pytest.raises(OptionError, match="merged with the tokenizer of a folder; pass that folder"):
        verify_merge(folder, tok.base, tok.plain)  # the manifest records a folder, not which
    manifest = json.loads((folder / "qwen_merge.json").read_text())
    assert manifest["options"]["tokenizer"] == "folder" and manifest["tokenizer"]["source"] == "folder"
    adapter = merge_shards(tok.base, tok.reserialized, tmp_path / "adapter", progress=False, tokenizer="adapter")
    assert tokenizer_bytes(tmp_path / "adapter") == tokenizer_bytes(tok.reserialized)
    assert adapter.plan.tokenizer.source == "adapter"
    with pytest.raises(OptionError, match="^tokenizer: 'adapter': .* holds no whole tokenizer"):
        plan_merge(tok.base, tok.plain, tokenizer="adapter")
    with pytest.raises(OptionError, match="^tokenizer: .* expected auto, base, adapter or a folder"):
        plan_merge(tok.base, tok.plain, tokenizer=tmp_path / "nowhere")
    with pytest.raises(OutputError, match="destination is the input"):  # the tokenizer folder is an input
        merge_shards(tok.base, tok.plain, tok.folder, overwrite=True, progress=False, tokenizer=tok.folder)
    assert tokenizer_bytes(tok.folder)


def test_tokenizer_option_on_the_cli(tok, tmp_path, capsys):
    out = tmp_path / "base"
    merged = cli(capsys, "merge", tok.base, tok.added, out, "--tokenizer", "base", "--quiet")
    assert merged.returncode == 0, merged.stderr
    assert tokenizer_bytes(out) == tokenizer_bytes(tok.base)
    checked = cli(capsys, "verify", out, "--base", tok.base, "--adapter", tok.added, "--tokenizer", "base")
    assert checked.returncode == 0, checked.stdout
    planned = cli(capsys, "plan", tok.base, tok.plain, "--tokenizer", tok.folder)
    assert f"tokenizer: from {tok.folder} (chosen with the tokenizer option)" in planned.stdout
    merged = cli(capsys, "merge", tok.base, tok.plain, tmp_path / "folder", "--tokenizer", tok.folder, "--quiet")
    assert merged.returncode == 0, merged.stderr
    assert tokenizer_bytes(tmp_path / "folder") == tokenizer_bytes(tok.folder)
    checked = cli(capsys, "verify", tmp_path / "folder", "--base", tok.base, "--adapter", tok.plain,
                      "--tokenizer", tok.folder)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    resumed = cli(capsys, "merge", tok.base, tok.added, out, "--resume", "--tokenizer", "auto")
    assert "option tokenizer changed: 'base' -> 'auto'" in error_line(resumed)
    line = error_line(cli(capsys, "plan", tok.base, tok.plain, "--tokenizer", "adapter"))
    assert line.startswith("error: --tokenizer: 'adapter': ") and "holds no whole tokenizer" in line


# -- Hub inputs ---------------------------------------------------------------------------------------------

def test_hub_adapter_and_base_bring_their_tokenizers(tok, tmp_path, monkeypatch):
    local = tmp_path / "local"
    merge_shards(tok.base, tok.added, local, progress=False)
    with FakeHub() as server:
        server.add_repo("org/base", tok.base)
        server.add_repo("org/added", tok.added)
        use_hub(monkeypatch, server, tmp_path / "hf-cache", home=tmp_path / "hf-home", fast_retries=True)
        plan = plan_merge("org/base", "org/added")
        assert plan.tokenizer.source == "adapter"
        assert {p.name for p in plan.tokenizer.files} == set(tokenizer_bytes(tok.added))
        merge_shards("org/base", "org/added", tmp_path / "hub", progress=False)
        assert verify_merge(tmp_path / "hub", "org/base", "org/added").ok
    assert tokenizer_bytes(tmp_path / "hub") == tokenizer_bytes(local) == tokenizer_bytes(tok.added)
    assert output_files(tmp_path / "hub") == output_files(local)
    assert set(TOKENIZER_FILES) & output_files(local) == set(tokenizer_bytes(tok.added))


# -- several adapters: the one tokenizer the output can have ----------------------------------------------

def test_several_adapters_take_the_one_tokenizer_that_means_something_else(tok):
    """With several adapters, "auto" takes the tokenizer of the adapter that brings one of its own, whatever its
    place; adapters whose files mean the base's (or that have none) do not count, and two that bring the same
    one are one choice."""
    for adapters in ([tok.plain, tok.template], [tok.template, tok.reserialized], [tok.template, tok.template]):
        plan = plan_merge(tok.base, adapters, weights=[0.5, 0.5])
        k = adapters.index(tok.template) + 1
        assert plan.tokenizer.source == "adapter" and plan.tokenizer.files == files_in(tok.template), adapters
        assert plan.tokenizer.reason == f"adapter {k} ({tok.template})'s: chat template differs"
    plan = plan_merge(tok.base, [tok.plain, tok.reserialized], weights=[0.5, 0.5])
    assert plan.tokenizer.source == "base" and plan.tokenizer.files == files_in(tok.base)
    plan = plan_merge(tok.base, [tok.template, tok.plain], weights=[0.5, 0.5], tokenizer="adapter")  # the first's
    assert plan.tokenizer.source == "adapter" and plan.tokenizer.files == files_in(tok.template)
    with pytest.raises(OptionError, match="'adapter': the adapter folder holds no whole tokenizer"):
        plan_merge(tok.base, [tok.plain, tok.template], tokenizer="adapter")


def test_two_adapters_with_different_tokenizers_are_refused_in_one_line(tok, capsys):
    with pytest.raises(OptionError) as e:
        plan_merge(tok.base, [tok.template, tok.added])
    assert str(e.value).startswith(f"tokenizer: adapter 1 ({tok.template}) and adapter 2 ({tok.added}) each bring "
                                   f"a tokenizer of their own, and they differ (")
    assert str(e.value).endswith("choose it with the tokenizer option (the folder of the one to keep, or base)")
    assert error_line(cli(capsys, "plan", tok.base, tok.template, tok.added)) == f"error: --{e.value}"
    chosen = plan_merge(tok.base, [tok.template, tok.added], tokenizer=str(tok.added))
    assert chosen.tokenizer.source == "folder" and chosen.tokenizer.files == files_in(tok.added)
