"""llama.cpp's own converter (convert_hf_to_gguf.py) as the reference for our GGUF output, and a GGUF reader.

* :func:`converter_dir`: the converter, obtained the way the tests obtain PEFT: from the package registry
  (the llama-cpp-python sdist, which vendors llama.cpp), downloaded once into a cache that survives between
  runs (``$QWEN_MERGE_TEST_CACHE``, else ``~/.cache/qwen-merge-tests``), and only its converter extracted
  (``convert_hf_to_gguf.py``, ``conversion/`` and its own ``gguf-py/``). Nothing is built.
* :func:`convert` / :class:`Converter`: one or many model folders converted in ONE Python subprocess (torch
  and transformers are imported once), with the converter's vendored gguf-py, as ``python convert_hf_to_gguf.py
  DIR --outfile X --outtype T`` would.
* :func:`read_gguf` -> :class:`GGUFContents` (pip ``gguf``'s GGUFReader) and :func:`differences`, a readable
  list of what differs between two files, provenance fields (names, licence, tags, ...) left out.
* :func:`write_gguf`: a GGUFContents written back with pip ``gguf``'s writer (tests of :func:`differences`).
"""

from __future__ import annotations

import json
import os
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from builders import cli_env, python_argv

LLAMA_CPP_PYTHON = "llama-cpp-python"
VERSION = "0.3.36"
SDIST = f"llama_cpp_python-{VERSION}.tar.gz"
# What the tests need from the sdist: the converter script, its model classes and its own gguf-py.
WANTED = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")

# general.* fields that say where a model comes from, not what it is: left out of comparisons.
PROVENANCE_KEYS = frozenset({
    "general.name", "general.basename", "general.finetune", "general.version", "general.size_label",
    "general.license", "general.license.name", "general.license.link", "general.tags", "general.datasets",
    "general.languages", "general.repo_url", "general.url", "general.doi", "general.uuid", "general.quantized_by",
    "general.organization", "general.description", "general.author",
})
PROVENANCE_PREFIXES = ("general.base_model.", "general.dataset.", "general.source.")
# The reader's pseudo-fields: the KV count differs whenever a provenance field does, so it is left out too.
IGNORED_KEYS = frozenset({"GGUF.kv_count"})


def is_provenance(key: str) -> bool:
    return key in PROVENANCE_KEYS or key in IGNORED_KEYS or key.startswith(PROVENANCE_PREFIXES)


# --------------------------------------------------------------------------------------------------
# Obtaining the converter


def cache_dir() -> Path:
    """Where downloads are kept between test runs."""
    root = os.environ.get("QWEN_MERGE_TEST_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "qwen-merge-tests"


def download_sdist(cache: Path) -> Path:
    """The llama-cpp-python sdist, downloaded from the registry by pip into `cache` (~76 MB). Never built."""
    target = cache / SDIST
    with tempfile.TemporaryDirectory(dir=cache, prefix=".download-") as tmp:
        proc = subprocess.run(python_argv("-m", "pip", "download", f"{LLAMA_CPP_PYTHON}=={VERSION}", "--no-binary",
                                          ":all:", "--no-deps", "--disable-pip-version-check", "-d", tmp),
                              capture_output=True, text=True, timeout=900)
        got = Path(tmp) / SDIST
        if proc.returncode != 0 or not got.is_file():
            raise RuntimeError(f"pip download {LLAMA_CPP_PYTHON}=={VERSION} failed (exit {proc.returncode}):\n"
                               f"{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
        os.replace(got, target)
    return target


def extract_converter(sdist: Path, dest: Path) -> Path:
    """Only the converter's files out of the sdist's vendor/llama.cpp/, into `dest` (atomically)."""
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".extract-") as tmp:
        with tarfile.open(sdist) as tar:
            members = []
            for member in tar.getmembers():
                _, sep, rel = member.name.partition("/vendor/llama.cpp/")
                if sep and (rel in WANTED or rel.startswith(WANTED[1:])) and (member.isfile() or member.isdir()):
                    member.name = rel
                    members.append(member)
            safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(tmp, members=members, **safe)
        if not (Path(tmp) / WANTED[0]).is_file():
            raise RuntimeError(f"{sdist} holds no vendor/llama.cpp/{WANTED[0]}")
        os.chmod(tmp, 0o755)  # TemporaryDirectory makes it private
        os.replace(tmp, dest)
        Path(tmp).mkdir()  # for TemporaryDirectory's cleanup
    return dest


def converter_dir() -> Path:
    """The folder holding convert_hf_to_gguf.py, conversion/ and gguf-py/ (downloaded and extracted once)."""
    cache = cache_dir()
    dest = cache / f"llama.cpp-{VERSION}"
    if not (dest / WANTED[0]).is_file():
        cache.mkdir(parents=True, exist_ok=True)
        sdist = cache / SDIST
        extract_converter(sdist if sdist.is_file() else download_sdist(cache), dest)
    return dest


# --------------------------------------------------------------------------------------------------
# Running it

# Runs in the subprocess: argv[1] = the converter folder; stdin = JSON list of [model_dir, outfile, outtype],
# read once everything is imported (the caller may start it early and prepare the models meanwhile).
_DRIVER = r"""
import json, logging, runpy, sys
from pathlib import Path

root = Path(sys.argv[1])
sys.path[0:0] = [str(root), str(root / "gguf-py")]  # the converter's own gguf-py, as the script itself does

import gguf
assert Path(gguf.__file__).resolve().is_relative_to(root.resolve()), gguf.__file__
import conversion.base

# Tiny test tokenizers are not in the converter's table of pre-tokenizer hashes; the Qwen ones are "qwen2".
conversion.base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "qwen2"

# Qwen2Model.set_vocab tries the sentencepiece vocabulary first and falls back to BPE on FileNotFoundError,
# but imports sentencepiece before it looks for tokenizer.model: look first, so the package is not needed.
_sentencepiece_vocab = conversion.base.TextModel._create_vocab_sentencepiece


def _create_vocab_sentencepiece(self):
    if not (self.dir_model / "tokenizer.model").is_file():
        raise FileNotFoundError(f"File not found: {self.dir_model / 'tokenizer.model'}")
    return _sentencepiece_vocab(self)


conversion.base.TextModel._create_vocab_sentencepiece = _create_vocab_sentencepiece

script = runpy.run_path(str(root / "convert_hf_to_gguf.py"), run_name="convert_hf_to_gguf")
logging.basicConfig(level=logging.WARNING)
jobs = json.loads(sys.stdin.read())
for model, outfile, outtype in jobs:
    sys.argv = [str(root / "convert_hf_to_gguf.py"), model, "--outfile", outfile, "--outtype", outtype]
    script["main"]()
    assert Path(outfile).is_file(), outfile
"""


@dataclass(frozen=True)
class Job:
    model: Path
    outfile: Path
    outtype: str  # f32, f16, bf16, q8_0 or auto


class Converter:
    """llama.cpp's converter in a subprocess started at once (it spends seconds importing torch and
    transformers) and given all its jobs by :meth:`run`. A context manager: leaving it ends the subprocess."""

    def __init__(self) -> None:
        root = converter_dir()
        env = dict(cli_env(), HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", TOKENIZERS_PARALLELISM="false")
        env.pop("NO_LOCAL_GGUF", None)  # the converter's own gguf-py, not pip's
        self.proc = subprocess.Popen(python_argv("-c", _DRIVER, root), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env=env)

    def run(self, jobs: list[Job], *, timeout: float = 600) -> None:
        """Convert every job's model folder, in order; raises with the converter's stderr if one fails."""
        for job in jobs:
            if "reranker" in str(job.model).lower():
                raise ValueError(f"{job.model}: the converter treats a 'reranker' path as a reranker model")
        spec = json.dumps([[str(j.model), str(j.outfile), j.outtype] for j in jobs])
        _, stderr = self.proc.communicate(spec, timeout=timeout)
        if self.proc.returncode != 0:
            raise RuntimeError(f"convert_hf_to_gguf.py failed (exit {self.proc.returncode}):\n{stderr[-6000:]}")

    def __enter__(self) -> Converter:
        return self

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()


def convert(jobs: list[Job], *, timeout: float = 600) -> None:
    """Convert every job's model folder with llama.cpp's converter, all in one subprocess."""
    with Converter() as converter:
        converter.run(jobs, timeout=timeout)


# --------------------------------------------------------------------------------------------------
# Reading and comparing GGUF files


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    shape: tuple[int, ...]  # torch order (the file stores ggml's reversed order)
    ggml_type: str  # GGMLQuantizationType name: F32, F16, BF16, Q8_0, ...
    data: bytes


@dataclass(frozen=True)
class GGUFContents:
    metadata: dict  # key -> (value, type): type is the value type's name, or ("ARRAY", element type name)
    tensors: list  # of GGUFTensor, in file order

    def value(self, key: str):
        return self.metadata[key][0]

    def tensor(self, name: str) -> GGUFTensor:
        return next(t for t in self.tensors if t.name == name)


def _field_value(field):
    from gguf import GGUFValueType

    main = field.types[0]
    if main == GGUFValueType.ARRAY:
        return list(field.contents()), ("ARRAY", field.types[-1].name)
    return field.contents(), main.name


def read_gguf(path: Path) -> GGUFContents:
    """Every metadata field (the reader's GGUF.* header fields included) and every tensor of a GGUF file."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    metadata = {name: _field_value(field) for name, field in reader.fields.items()}
    metadata["GGUF.alignment"] = (reader.alignment, "UINT32")
    tensors = [GGUFTensor(t.name, tuple(int(d) for d in reversed(t.shape.tolist())), t.tensor_type.name,
                          bytes(t.data.reshape(-1).view("uint8")))
               for t in reader.tensors]
    return GGUFContents(metadata, tensors)


def _short(value, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + f"... ({len(value)} items)"


def _value_difference(key: str, ours: tuple, theirs: tuple) -> str | None:
    (v1, t1), (v2, t2) = ours, theirs
    if t1 != t2:
        return f"{key}: type {t1} != {t2} (values {_short(v1)} vs {_short(v2)})"
    if v1 == v2:
        return None
    if isinstance(v1, list) and isinstance(v2, list):
        if len(v1) != len(v2):
            return f"{key}: {len(v1)} items != {len(v2)}"
        i = next(i for i, (a, b) in enumerate(zip(v1, v2)) if a != b)
        return f"{key}: item {i} {v1[i]!r} != {v2[i]!r}"
    return f"{key}: {_short(v1)} != {_short(v2)}"


def _tensor_differences(ours: list, theirs: list) -> list[str]:
    names1, names2 = [t.name for t in ours], [t.name for t in theirs]
    out = []
    if names1 != names2:
        only1, only2 = sorted(set(names1) - set(names2)), sorted(set(names2) - set(names1))
        if only1:
            out.append(f"tensors only in ours: {only1}")
        if only2:
            out.append(f"tensors only in theirs: {only2}")
        common = set(names1) & set(names2)
        order1, order2 = [n for n in names1 if n in common], [n for n in names2 if n in common]
        if order1 != order2:
            i = next(i for i, (a, b) in enumerate(zip(order1, order2)) if a != b)
            out.append(f"tensor order differs at position {i}: {order1[i]} (ours) vs {order2[i]} (theirs)")
    by_name = {t.name: t for t in theirs}
    for t1 in ours:
        t2 = by_name.get(t1.name)
        if t2 is None:
            continue
        if t1.shape != t2.shape:
            out.append(f"{t1.name}: shape {t1.shape} != {t2.shape}")
        if t1.ggml_type != t2.ggml_type:
            out.append(f"{t1.name}: type {t1.ggml_type} != {t2.ggml_type}")
        elif t1.data != t2.data:
            n = min(len(t1.data), len(t2.data))
            first = next((i for i in range(n) if t1.data[i] != t2.data[i]), n)
            diff = sum(a != b for a, b in zip(t1.data, t2.data))
            out.append(f"{t1.name}: {t1.ggml_type} bytes differ ({len(t1.data)} vs {len(t2.data)} bytes, "
                       f"{diff} differ, first at byte {first})")
    return out


def differences(ours: GGUFContents, theirs: GGUFContents) -> list[str]:
    """What differs between two GGUF files, one readable line each; [] when they hold the same model.

    Tensors: names, order, shapes, GGML types and bytes. Metadata: keys, value types and values (the order of
    the keys is not compared: readers look keys up by name), provenance fields left out."""
    out = []
    keys1 = {k for k in ours.metadata if not is_provenance(k)}
    keys2 = {k for k in theirs.metadata if not is_provenance(k)}
    for key in sorted(keys1 - keys2):
        out.append(f"{key}: only in ours ({_short(ours.metadata[key][0])})")
    for key in sorted(keys2 - keys1):
        out.append(f"{key}: only in theirs ({_short(theirs.metadata[key][0])})")
    for key in sorted(keys1 & keys2):
        line = _value_difference(key, ours.metadata[key], theirs.metadata[key])
        if line:
            out.append(line)
    return out + _tensor_differences(ours.tensors, theirs.tensors)


def write_gguf(contents: GGUFContents, path: Path) -> Path:
    """`contents` written as a GGUF file with pip gguf's writer (metadata in the given order, then tensors)."""
    import numpy as np
    from gguf import GGMLQuantizationType, GGUFValueType, GGUFWriter

    arch = contents.value("general.architecture")
    writer = GGUFWriter(path, arch)
    for key, (value, vtype) in contents.metadata.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        if isinstance(vtype, tuple):
            writer.add_key_value(key, value, GGUFValueType.ARRAY, sub_type=GGUFValueType[vtype[1]])
        else:
            writer.add_key_value(key, value, GGUFValueType[vtype])
    for t in contents.tensors:
        writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), len(t.data),
                               raw_dtype=GGMLQuantizationType[t.ggml_type])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    f = writer.fout[0]
    for t in contents.tensors:  # each tensor's data starts aligned, as in the files the converter writes
        writer.write_padding(f, f.tell())
        f.write(t.data)
    writer.write_padding(f, f.tell())
    writer.close()
    return Path(path)
