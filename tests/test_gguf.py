"""GGUF output (`merge_shards(base, adapter, "out.gguf", outtype=...)`, `qwen-merge merge ... out.gguf`) against
llama.cpp's own converter run on our safetensors merge of the same inputs.

The reference: convert_hf_to_gguf.py from the llama-cpp-python sdist (tests/llamacpp.py), run once over every
merged model in one subprocess. Our file must hold the same tensors in the same order (names, shapes, GGML
types, bytes) and the same metadata (keys, value types, values), provenance fields (name, licence, tags, ...)
left out. transformers is a second client: it loads our bf16 file of the default-shaped Qwen2 and Qwen3 with
the merged model's weights, logits and tokenizer.

The models (tests/gguf_models.py): Qwen2, Qwen3, Qwen2-MoE and Qwen3-MoE, tied and untied, several shards each,
a real BPE tokenizer with special and added tokens, padding rows, real PEFT LoRA adapters (experts and router
too on MoE), a resized-vocabulary adapter and an adapter with a tokenizer of its own.

Tests named ``test_ours_*`` and ``test_cli_*`` need the GGUF sink; the others check the reference harness itself.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
from pathlib import Path

import gguf_models as G
import llamacpp
import pytest
import torch
from builders import MergeCache, build_peft_adapter, one_error_line, run_cli, tree_hash

from qwen_merge.compute import ggufquant

# case -> (model, adapter kind, outtypes); "auto" is the converter's auto and our outtype=None (the default)
CASES = {
    "qwen2": ("qwen2", "lora", ("bf16", "q8_0", "f32")),
    "qwen2_tied": ("qwen2_tied", "lora", ("bf16", "q8_0")),
    "qwen3": ("qwen3", "lora", ("bf16", "q8_0", "f16", "auto")),
    "qwen3_tied_yarn": ("qwen3_tied_yarn", "lora", ("bf16", "q8_0")),
    "qwen2_moe": ("qwen2_moe", "lora", ("bf16", "q8_0", "f16")),
    "qwen3_moe": ("qwen3_moe", "lora", ("bf16", "q8_0")),
    "qwen3_moe_tied": ("qwen3_moe_tied", "lora", ("bf16", "q8_0")),
    "qwen3_resized": ("qwen3", "resized", ("bf16", "q8_0")),
    "qwen2_own_tokenizer": ("qwen2", "own_tokenizer", ("bf16", "q8_0")),
}
PAIRS = [(case, outtype) for case, (_, _, outtypes) in CASES.items() for outtype in outtypes]
CLIENT_CASES = ["qwen2", "qwen3"]  # default-shaped: transformers reads everything it needs from the file
PROVENANCE_DIR = "Provenance-Check-7B-Instruct-v2"
PROVENANCE_README = ("---\nlicense: apache-2.0\ntags:\n- chat\n- merged\nbase_model: Qwen/Qwen3-0.6B\n"
                     "language:\n- en\n---\n# A merged model\n")
# the supported architectures: class name (config.json's architectures) and GGUF name (either may be named)
SUPPORTED = {"Qwen2ForCausalLM": "qwen2", "Qwen2MoeForCausalLM": "qwen2moe", "Qwen3ForCausalLM": "qwen3",
             "Qwen3MoeForCausalLM": "qwen3moe"}


class GGUFWorld:
    """Every model and adapter, our safetensors merges and the converter's GGUF of each, built once.

    ``ours(case, outtype)`` merges straight to GGUF (the sink under test), once per pair."""

    def __init__(self, root: Path) -> None:
        self.root = root
        with llamacpp.Converter() as converter:  # it imports torch and transformers while the models are built
            tokenizer = G.build_tokenizer(root / "tokenizer")
            self.bases = {name: G.build_model(spec, root / "bases" / name, tokenizer, seed=i)
                          for i, (name, spec) in enumerate(G.MODELS.items())}
            self.adapters = {case: self._adapter(case, model, kind, seed=100 + i)
                             for i, (case, (model, kind, _)) in enumerate(CASES.items())}
            merges = MergeCache(root / "merged")
            self.merged = {case: merges(self.base(case), self.adapters[case]).out for case in CASES}
            self.provenance = self._provenance_copy(self.merged["qwen2"], root / PROVENANCE_DIR)
            (root / "converted").mkdir()
            jobs = [llamacpp.Job(self.merged[case], self.reference(case, outtype), outtype) for case, outtype in PAIRS]
            converter.run([*jobs, llamacpp.Job(self.provenance, self.provenance_reference, "bf16")])
        self._ours: dict[tuple[str, str], Path] = {}

    def base(self, case: str) -> Path:
        return self.bases[CASES[case][0]]

    def _adapter(self, case: str, model: str, kind: str, seed: int) -> Path:
        out = self.root / "adapters" / case
        if kind == "resized":
            return G.build_resized_adapter(self.bases[model], out, seed=seed)
        if kind == "own_tokenizer":
            return G.build_own_tokenizer_adapter(G.MODELS[model], self.bases[model], out, seed=seed)
        return G.build_lora(G.MODELS[model], self.bases[model], out, seed=seed)

    @staticmethod
    def _provenance_copy(merged: Path, out: Path) -> Path:
        """The qwen2 merge again, in a folder whose name and README give the converter other provenance."""
        shutil.copytree(merged, out)
        (out / "README.md").write_text(PROVENANCE_README)
        return out

    def reference(self, case: str, outtype: str) -> Path:
        return self.root / "converted" / f"{case}.{outtype}.gguf"

    @property
    def provenance_reference(self) -> Path:
        return self.root / "converted" / "provenance.bf16.gguf"

    def ours(self, case: str, outtype: str) -> Path:
        """merge_shards(base, adapter, <fresh folder>/out.gguf, outtype=...): inputs unchanged, one file written."""
        if (case, outtype) not in self._ours:
            from qwen_merge import merge_shards

            parent = self.root / "ours" / f"{case}.{outtype}"
            shutil.rmtree(parent, ignore_errors=True)  # what an earlier failed attempt left
            parent.mkdir(parents=True)
            base, adapter = self.base(case), self.adapters[case]
            before = (tree_hash(base), tree_hash(adapter))
            kwargs = {} if outtype == "auto" else {"outtype": outtype}
            with pytest.MonkeyPatch.context() as patch:  # one row per conversion: every tensor is written in parts
                patch.setattr(ggufquant, "CHUNK_VALUES", 1)
                report = merge_shards(base, adapter, parent / "out.gguf", progress=False, **kwargs)
            assert (tree_hash(base), tree_hash(adapter)) == before, "an input folder changed"
            assert sorted(p.name for p in parent.iterdir()) == ["out.gguf"]
            assert Path(report.output) == parent / "out.gguf"
            self._ours[case, outtype] = parent / "out.gguf"
        return self._ours[case, outtype]


@pytest.fixture(scope="session")
def gguf_world(tmp_path_factory) -> GGUFWorld:
    return GGUFWorld(tmp_path_factory.mktemp("gguf"))


def _pair_id(pair: tuple[str, str]) -> str:
    return f"{pair[0]}-{pair[1]}"


# --------------------------------------------------------------------------------------------------
# The comparison itself (no models, no download): it finds each kind of difference and ignores provenance

def _contents() -> llamacpp.GGUFContents:
    metadata = {"GGUF.version": (3, "UINT32"), "GGUF.tensor_count": (3, "UINT64"), "GGUF.kv_count": (5, "UINT64"),
                "general.architecture": ("qwen3", "STRING"), "general.name": ("A", "STRING"),
                "qwen3.block_count": (2, "UINT32"), "qwen3.rope.freq_base": (1000000.0, "FLOAT32"),
                "tokenizer.ggml.tokens": (["a", "b", "[PAD2]"], ("ARRAY", "STRING")), "GGUF.alignment": (32, "UINT32")}
    tensors = [llamacpp.GGUFTensor("output.weight", (2, 32), "Q8_0", bytes(range(68))),
               llamacpp.GGUFTensor("token_embd.weight", (2, 4), "F32", bytes(32)),
               llamacpp.GGUFTensor("output_norm.weight", (4,), "F32", bytes(16))]
    return llamacpp.GGUFContents(metadata, tensors)


def test_differences_none_for_same_contents_and_other_provenance():
    a, b = _contents(), _contents()
    b.metadata.update({"general.name": ("B", "STRING"), "general.license": ("mit", "STRING"),
                       "general.base_model.0.name": ("X", "STRING"), "GGUF.kv_count": (7, "UINT64")})
    assert llamacpp.differences(a, b) == []


@pytest.mark.parametrize("change, expected", [
    (lambda m, t: m.update({"qwen3.block_count": (3, "UINT32")}), "qwen3.block_count: 3 != 2"),
    (lambda m, t: m.update({"qwen3.block_count": (2, "UINT64")}), "qwen3.block_count: type UINT64 != UINT32"),
    (lambda m, t: m.update({"qwen3.rope.freq_base": (1000000.0625, "FLOAT32")}), "qwen3.rope.freq_base: "),
    (lambda m, t: m.pop("qwen3.block_count"), "qwen3.block_count: only in theirs"),
    (lambda m, t: m.update({"tokenizer.ggml.add_bos_token": (False, "BOOL")}), "add_bos_token: only in ours"),
    (lambda m, t: m.update({"tokenizer.ggml.tokens": (["a", "c", "[PAD2]"], ("ARRAY", "STRING"))}),
     "tokenizer.ggml.tokens: item 1 'c' != 'b'"),
    (lambda m, t: t.reverse(), "tensor order differs at position 0: output_norm.weight (ours)"),
    (lambda m, t: t.pop(), "tensors only in theirs: ['output_norm.weight']"),
    (lambda m, t: t.__setitem__(1, dataclasses.replace(t[1], shape=(4, 2))), "token_embd.weight: shape (4, 2)"),
    (lambda m, t: t.__setitem__(1, dataclasses.replace(t[1], ggml_type="F16")), "token_embd.weight: type F16"),
    (lambda m, t: t.__setitem__(0, dataclasses.replace(t[0], data=bytes(range(67)) + b"\xff")),
     "output.weight: Q8_0 bytes differ (68 vs 68 bytes, 1 differ, first at byte 67)"),
], ids=["value", "value-type", "float", "missing-key", "extra-key", "array-item", "tensor-order", "missing-tensor",
        "shape", "ggml-type", "bytes"])
def test_differences_names_what_differs(change, expected):
    ours, theirs = _contents(), _contents()
    change(ours.metadata, ours.tensors)
    found = llamacpp.differences(ours, theirs)
    assert len(found) == 1 and expected in found[0], found


def test_written_contents_read_back_the_same(tmp_path):
    contents = _contents()
    path = llamacpp.write_gguf(contents, tmp_path / "x.gguf")
    back = llamacpp.read_gguf(path)
    assert llamacpp.differences(back, contents) == []
    assert [t.data for t in back.tensors] == [t.data for t in contents.tensors]


def test_converter_is_taken_from_the_cached_sdist_alone(tmp_path, monkeypatch):
    """With the sdist in the cache nothing is downloaded, and only the converter's files are extracted."""
    import io
    import tarfile

    top = f"llama_cpp_python-{llamacpp.VERSION}"
    vendor = f"{top}/vendor/llama.cpp"
    files = {f"{vendor}/convert_hf_to_gguf.py": b"# script", f"{vendor}/conversion/qwen.py": b"# qwen",
             f"{vendor}/gguf-py/gguf/__init__.py": b"# gguf", f"{vendor}/src/x.c": b"int x;",
             f"{top}/llama_cpp/__init__.py": b"# bindings", f"{vendor}/conversion.txt": b"not the package"}
    with tarfile.open(tmp_path / llamacpp.SDIST, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    monkeypatch.setenv("QWEN_MERGE_TEST_CACHE", str(tmp_path))
    monkeypatch.setattr(llamacpp, "download_sdist", lambda cache: pytest.fail("downloaded although cached"))
    folder = llamacpp.converter_dir()
    assert folder == tmp_path / f"llama.cpp-{llamacpp.VERSION}"
    assert sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) == [
        "conversion/qwen.py", "convert_hf_to_gguf.py", "gguf-py/gguf/__init__.py"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([llamacpp.SDIST, folder.name])
    assert llamacpp.converter_dir() == folder  # extracted once


# --------------------------------------------------------------------------------------------------
# The reference harness on real models (runs without the sink)

@pytest.mark.slow
def test_converter_reference_files(gguf_world):
    """The converter wrote every file, with what the tests rely on: padding rows, the added tokens, tied
    models without output.weight, the q8_0 fallback to f16 for the 48-wide shared expert."""
    for case, outtype in PAIRS:
        g = llamacpp.read_gguf(gguf_world.reference(case, outtype))
        tokens = g.value("tokenizer.ggml.tokens")
        names = [t.name for t in g.tensors]
        assert g.value("tokenizer.ggml.pre") == "qwen2" and G.ADDED in tokens, case
        assert tokens[-1] == f"[PAD{len(tokens) - 1}]", case
        assert ("output.weight" in names) == (not G.MODELS[CASES[case][0]].tied), case
    resized = llamacpp.read_gguf(gguf_world.reference("qwen3_resized", "bf16"))
    assert len(resized.value("tokenizer.ggml.tokens")) == G.RESIZED
    assert set(G.NEW_TOKENS) <= set(resized.value("tokenizer.ggml.tokens"))
    own = llamacpp.read_gguf(gguf_world.reference("qwen2_own_tokenizer", "bf16"))
    assert own.value("tokenizer.chat_template") == G.OWN_TEMPLATE
    assert G.OWN_TOKEN in own.value("tokenizer.ggml.tokens")
    moe = llamacpp.read_gguf(gguf_world.reference("qwen2_moe", "q8_0"))
    assert moe.tensor("blk.0.ffn_down_shexp.weight").ggml_type == "F16"
    assert moe.tensor("blk.0.ffn_down_exps.weight").ggml_type == "Q8_0"


@pytest.mark.slow
def test_comparison_of_real_files(gguf_world, tmp_path):
    """Real files: another folder name and README change only provenance fields (the comparison sees none);
    a file written back from what was read is the converter's file byte for byte; one changed byte is seen."""
    plain = llamacpp.read_gguf(gguf_world.reference("qwen2", "bf16"))
    other = llamacpp.read_gguf(gguf_world.provenance_reference)
    assert other.value("general.license") == "apache-2.0" and "general.license" not in plain.metadata
    assert other.value("general.name") != plain.value("general.name")
    assert llamacpp.differences(plain, other) == []

    source = gguf_world.reference("qwen2_moe", "q8_0")
    real = llamacpp.read_gguf(source)
    assert llamacpp.write_gguf(real, tmp_path / "same.gguf").read_bytes() == source.read_bytes()
    t = real.tensors[5]
    changed = dataclasses.replace(real, tensors=[*real.tensors[:5],
                                                 dataclasses.replace(t, data=t.data[:-1] + bytes([t.data[-1] ^ 1])),
                                                 *real.tensors[6:]])
    found = llamacpp.differences(llamacpp.read_gguf(llamacpp.write_gguf(changed, tmp_path / "x.gguf")), real)
    assert found == [f"{t.name}: {t.ggml_type} bytes differ ({len(t.data)} vs {len(t.data)} bytes, 1 differ, "
                     f"first at byte {len(t.data) - 1})"]


def _logit_inputs() -> torch.Tensor:
    return torch.randint(0, G.VOCAB, (2, 12), generator=torch.Generator().manual_seed(5))


def _check_transformers_client(merged: Path, base: Path, gguf: Path) -> None:
    """transformers loads `gguf` with exactly the merged (bf16) weights, the same logits and the same tokenizer.

    The bf16 file holds the merged bf16 values exactly (norms and biases as f32, which holds every bf16 value),
    so both models are loaded in fp32 with identical weights (checked element for element) and run the same
    code. Their logits can then differ only through fp32 summation order: each dot product here has at most
    96 terms, so its error is below 96·2^-24·Σ|terms| ≈ 6e-6 relative, and through the ~6 chained products
    of two layers and the head it stays below 4e-5 of the logits' size; 1e-4 of it is allowed. The
    adapter's own effect on the logits must be far larger, so a file that lost the adapter fails."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ref = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    got = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    ref_sd, got_sd = ref.state_dict(), got.state_dict()
    assert sorted(ref_sd) == sorted(got_sd)
    unequal = [name for name in ref_sd if not torch.equal(ref_sd[name], got_sd[name])]
    assert unequal == [], f"weights differ from the merged model's: {unequal}"

    ids = _logit_inputs()
    with torch.no_grad():
        expected, actual = ref(input_ids=ids).logits, got(input_ids=ids).logits
        before = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()(input_ids=ids).logits
    tolerance = 1e-4 * expected.abs().max().item()
    assert (actual - expected).abs().max().item() <= tolerance
    assert (before - expected).abs().max().item() > 100 * tolerance, "the adapter barely changes the logits"

    original = AutoTokenizer.from_pretrained(merged)
    loaded = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    expected_ids = original.encode(G.SAMPLE)
    assert original.convert_tokens_to_ids(G.ADDED) in expected_ids
    assert original.convert_tokens_to_ids("<|im_start|>") in expected_ids
    assert loaded.encode(G.SAMPLE) == expected_ids
    assert loaded.decode(expected_ids) == original.decode(expected_ids)


@pytest.mark.slow
@pytest.mark.parametrize("case", CLIENT_CASES)
def test_transformers_loads_the_converter_file(gguf_world, case):
    """The client check on the converter's own file: proves the check (and its bound) before it judges ours."""
    _check_transformers_client(gguf_world.merged[case], gguf_world.base(case), gguf_world.reference(case, "bf16"))


# --------------------------------------------------------------------------------------------------
# Our GGUF output (needs the GGUF sink)

@pytest.mark.slow
@pytest.mark.parametrize("pair", PAIRS, ids=_pair_id)
def test_ours_equals_the_converter_on_our_merge(gguf_world, pair):
    """Same tensors (order, names, shapes, types, bytes) and metadata (provenance aside) as llama.cpp's
    converter writes from our safetensors merge of the same base and adapter."""
    case, outtype = pair
    ours = llamacpp.read_gguf(gguf_world.ours(case, outtype))
    theirs = llamacpp.read_gguf(gguf_world.reference(case, outtype))
    found = llamacpp.differences(ours, theirs)
    assert found == [], f"{case} {outtype}: our GGUF differs from the converter's:\n" + "\n".join(found)


@pytest.mark.slow
@pytest.mark.parametrize("case", CLIENT_CASES)
def test_ours_loads_in_transformers(gguf_world, case):
    _check_transformers_client(gguf_world.merged[case], gguf_world.base(case), gguf_world.ours(case, "bf16"))


@pytest.mark.slow
def test_cli_merge_writes_the_python_file(gguf_world, tmp_path):
    """`qwen-merge merge BASE ADAPTER out.gguf --outtype q8_0` writes the file merge_shards writes."""
    case = "qwen2_moe"
    out = tmp_path / "cli" / "out.gguf"
    out.parent.mkdir()
    proc = run_cli("merge", gguf_world.base(case), gguf_world.adapters[case], out, "--outtype", "q8_0")
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes() == gguf_world.ours(case, "q8_0").read_bytes()
    assert sorted(p.name for p in out.parent.iterdir()) == ["out.gguf"]


@pytest.mark.slow
@pytest.mark.parametrize("outtype, types", [(None, ("bf16", "f32")), ("q8_0", ("q8_0", "f32"))])
def test_cli_plan_names_the_gguf_types(gguf_world, tmp_path, outtype, types):
    out = tmp_path / "out.gguf"
    args = ("--outtype", outtype) if outtype else ()
    proc = run_cli("plan", gguf_world.base("qwen3"), gguf_world.adapters["qwen3"], out, *args)
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout.lower()
    assert "gguf" in text and all(t in text for t in types), proc.stdout
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.fixture(scope="session")
def unsupported_pair(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny Qwen3-Next (no GGUF mapping in this sink) and a LoRA on its attention."""
    import fixtures_arch

    root = tmp_path_factory.mktemp("gguf-unsupported")
    base = fixtures_arch.build_base(fixtures_arch.ARCHS["qwen3_next"], root / "base")
    adapter = build_peft_adapter(base, root / "adapter", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
                                 seed=1)
    return base, adapter


@pytest.mark.slow
@pytest.mark.parametrize("command", ["plan", "merge"])
def test_cli_refuses_an_unsupported_architecture(unsupported_pair, tmp_path, command):
    base, adapter = unsupported_pair
    out = tmp_path / "out.gguf"
    line = one_error_line(run_cli(command, base, adapter, out))
    assert "Qwen3NextForCausalLM" in line, line
    unnamed = [cls for cls, arch in SUPPORTED.items() if cls not in line and not re.search(rf"\b{arch}\b", line)]
    assert unnamed == [], f"the error does not name the supported {unnamed}: {line}"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_ours_refuses_an_unsupported_architecture_from_python(unsupported_pair, tmp_path):
    from qwen_merge import merge_shards
    from qwen_merge.errors import QwenMergeError

    with pytest.raises(QwenMergeError, match="Qwen3NextForCausalLM"):
        merge_shards(*unsupported_pair, tmp_path / "out.gguf", outtype="q8_0", progress=False)
    assert list(tmp_path.iterdir()) == []
