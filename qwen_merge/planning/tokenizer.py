"""Which tokenizer the merged model gets: the base's, the one saved beside the adapter, or a folder's.

Trainers save the tokenizer beside the adapter; it differs from the base's when tokens were added (a
resized vocabulary) or the chat template changed, and then the merged model needs it. It also differs,
harmlessly, when a newer transformers re-serialized the same tokenizer; the base's bytes are kept then,
as other tools load them more reliably. What is compared (`TokenizerFacts`), after parsing the files
with `json` alone:

* the vocabulary: tokenizer.json's `model` type, `vocab` and `merges` (a merge written "a b" or
  ["a", "b"] is the same merge); else vocab.json + merges.txt; else vocab.txt; else tokenizer.model's bytes;
* the added tokens, id -> content and whether special: tokenizer.json's `added_tokens`, else
  tokenizer_config.json's `added_tokens_decoder`, else added_tokens.json;
* the special tokens (bos, eos, unk, sep, pad, cls, mask and the additional ones): tokenizer_config.json,
  with special_tokens_map.json on top;
* the chat template(s): chat_template.jinja, else chat_template.json, else tokenizer_config.json's
  `chat_template`.

Everything else (key order, indentation, `model_max_length`, fields a transformers version adds) is
formatting. The output never mixes two tokenizers: it takes one whole set of tokenizer files, and the
base's files of that kind are left out when another set is taken.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import FormatError, OptionError
from ..inputs.digest import sha256_file

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt", "vocab.txt",
                   "tokenizer.model")
VOCABULARY_FILES = ("tokenizer.json", "vocab.json", "vocab.txt", "tokenizer.model")  # a whole tokenizer has one
SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
EXTRA_KEYS = ("additional_special_tokens", "extra_special_tokens")  # transformers 4 and 5 names of one list
SHOWN_TOKENS = 5  # added tokens named in the plan's line; more are counted


@dataclass(frozen=True, slots=True)
class TokenizerChoice:
    """The tokenizer the output gets. `source`: "base", "adapter" or "folder"; `files`: its tokenizer files,
    copied into the output; `left_out`: names of the base's tokenizer files that are not copied (the
    output takes another whole set); `reason`: why, in words, for the plan."""

    source: str
    files: tuple[Path, ...]
    left_out: tuple[str, ...]
    reason: str

    def __str__(self) -> str:
        if not self.files:
            owner = "none"
        else:
            owner = {"base": "base's", "adapter": "adapter's"}.get(self.source, f"from {self.files[0].parent}")
        return f"{owner} ({self.reason})"


@dataclass(frozen=True, slots=True)
class TokenizerFacts:
    """What a set of tokenizer files means, without its formatting (see the module docstring)."""

    vocabulary: object
    added: dict[int, tuple[str, bool]]
    special: dict[str, object]
    templates: dict[str, str]


@dataclass(frozen=True, slots=True)
class TokenizerRecord:
    """The tokenizer part of a merge's identity: where the output's tokenizer files come from ("adapter" or
    "folder") and each file's SHA-256 by name. None where a record read from a file does not say."""

    source: str | None
    files: dict[str, str]


def tokenizer_files(paths: Iterable[Path]) -> tuple[Path, ...]:
    """The tokenizer files among `paths`, by name."""
    return tuple(sorted((p for p in paths if p.name in TOKENIZER_FILES), key=lambda p: p.name))


def files_in(folder: Path) -> tuple[Path, ...]:
    """The tokenizer files a folder holds."""
    return tokenizer_files(folder / name for name in TOKENIZER_FILES if (folder / name).is_file())


def wants_adapter_files(option: str) -> bool:
    """Whether the adapter's tokenizer files are read (for a Hub adapter: downloaded) under this option."""
    return option in ("auto", "adapter")


def compares(option: str, adapter_files: Sequence[Path]) -> bool:
    """Whether `choose` reads the base's tokenizer files (for a Hub base: they must be downloaded first)."""
    return option == "auto" and _has_vocabulary(adapter_files)


def choose(option: str, base_side_files: Sequence[Path], adapter_files: Sequence[Path]) -> TokenizerChoice:
    """The tokenizer of the output, under `option` ("auto", "base", "adapter" or a folder path), from the
    base's side files and the tokenizer files beside the adapter. With "auto" the base's tokenizer files
    must be readable (a Hub base's are downloaded first).

    Raises:
        OptionError: "adapter" or a folder that holds no whole tokenizer.
        FormatError: a tokenizer file that "auto" compares is not valid JSON.
    """
    base = tokenizer_files(base_side_files)
    adapter = tuple(adapter_files)
    if option == "base":
        return TokenizerChoice("base", base, (), "chosen with the tokenizer option")
    if option == "adapter":
        _check_whole(adapter, "'adapter'", "the adapter folder")
        return _taken("adapter", adapter, base, "chosen with the tokenizer option")
    if option != "auto":
        folder = Path(option)
        if not folder.is_dir():
            raise OptionError(f"{option!r}: expected auto, base, adapter or a folder holding a tokenizer; no such "
                              f"folder", option="tokenizer")
        files = files_in(folder)
        _check_whole(files, repr(option), str(folder))
        return _taken("folder", files, base, "chosen with the tokenizer option")
    return _auto(base, adapter)


def choose_among(option: str, base_side_files: Sequence[Path], adapters: Sequence[tuple[str, Sequence[Path]]]
                 ) -> TokenizerChoice:
    """`choose` for several adapters, each given as (its name for messages, its tokenizer files). "auto": the
    base's, unless adapters bring a tokenizer that means something else; one such adapter's is taken, and
    several are taken only when they mean the same. "adapter": the first adapter's.

    Raises:
        OptionError: under "auto", two adapters bring tokenizers that differ from each other (the output can
            have one), or what `choose` raises.
    """
    if option != "auto":
        return choose(option, base_side_files, adapters[0][1])
    taken = [(name, choose(option, base_side_files, files)) for name, files in adapters]
    taken = [(name, choice) for name, choice in taken if choice.source == "adapter"]
    if not taken:
        return TokenizerChoice("base", tokenizer_files(base_side_files), (),
                               "no adapter brings a tokenizer that means something else")
    first_name, first = taken[0]
    for name, other in taken[1:]:
        changes = [] if _same_bytes(first.files, other.files) else differences(facts(first.files), facts(other.files))
        if changes:
            raise OptionError(f"{first_name} and {name} each bring a tokenizer of their own, and they differ "
                              f"({'; '.join(changes)}); the output "
                              f"takes one: choose it with the tokenizer option (the folder of the one to keep, "
                              f"or base)",
                              option="tokenizer")
    return dataclasses.replace(first, reason=f"{first_name}'s: {first.reason}")


def _auto(base: tuple[Path, ...], adapter: tuple[Path, ...]) -> TokenizerChoice:
    if not adapter:
        why = "the adapter has no tokenizer files" if base else "neither the base nor the adapter has tokenizer files"
        return TokenizerChoice("base", base, (), why)
    if not _has_vocabulary(adapter):
        names = ", ".join(p.name for p in adapter)
        return TokenizerChoice("base", base, (), f"the adapter's {names} hold no vocabulary, so they are not a "
                                                 f"whole tokenizer; they are not copied")
    if not _has_vocabulary(base):
        return _taken("adapter", adapter, base, "the base has no tokenizer")
    if _same_bytes(base, adapter):
        return TokenizerChoice("base", base, (), "the adapter's files are the same")
    changes = differences(facts(base), facts(adapter))
    if not changes:
        return TokenizerChoice("base", base, (), "the adapter's files differ only in formatting")
    return _taken("adapter", adapter, base, "; ".join(changes))


def _taken(source: str, files: tuple[Path, ...], base: tuple[Path, ...], reason: str) -> TokenizerChoice:
    return TokenizerChoice(source, files, tuple(p.name for p in base), reason)


def _check_whole(files: Sequence[Path], value: str, where: str) -> None:
    if not _has_vocabulary(files):
        found = ", ".join(p.name for p in files) or "no tokenizer files"
        raise OptionError(f"{value}: {where} holds no whole tokenizer ({found}; expected one of "
                          f"{', '.join(VOCABULARY_FILES)} with it)", option="tokenizer")


def _has_vocabulary(files: Sequence[Path]) -> bool:
    return any(p.name in VOCABULARY_FILES for p in files)


def _same_bytes(a: Sequence[Path], b: Sequence[Path]) -> bool:
    if [p.name for p in a] != [p.name for p in b]:
        return False
    return all(p.stat().st_size == q.stat().st_size and sha256_file(p) == sha256_file(q) for p, q in zip(a, b))


def differences(base: TokenizerFacts, adapter: TokenizerFacts) -> list[str]:
    """What the adapter's tokenizer changes, one short phrase each (empty: the same tokenizer)."""
    changes = []
    if adapter.vocabulary != base.vocabulary:
        changes.append("vocabulary differs")
    added = [content for i, (content, _) in sorted(adapter.added.items()) if base.added.get(i, (None,))[0] != content]
    if added:
        shown = ", ".join(added[:SHOWN_TOKENS]) + (", …" if len(added) > SHOWN_TOKENS else "")
        changes.append(f"adds {len(added)} token{'s' if len(added) > 1 else ''}: {shown}")
    removed = [i for i, (content, _) in base.added.items() if adapter.added.get(i, (None,))[0] != content]
    flagged = [i for i, (content, special) in adapter.added.items() if base.added.get(i) == (content, not special)]
    if removed:
        changes.append(f"replaces or removes {len(removed)} of the base's added tokens")
    if flagged:
        changes.append(f"changes the special flag of {len(flagged)} added tokens")
    special = sorted(k for k in base.special.keys() | adapter.special.keys()
                     if base.special.get(k) != adapter.special.get(k))
    if special:
        changes.append(f"special tokens differ: {', '.join(special)}")
    if adapter.templates != base.templates:
        changes.append("chat template differs" if adapter.templates and base.templates else
                       "adds a chat template" if adapter.templates else "has no chat template")
    return changes


def facts(files: Sequence[Path]) -> TokenizerFacts:
    """The meaning of a set of tokenizer files (see the module docstring).

    Raises:
        FormatError: a JSON file that cannot be read or parsed.
    """
    by_name = {p.name: p for p in files}
    tokenizer = _json(by_name.get("tokenizer.json"))
    config = _json(by_name.get("tokenizer_config.json"))
    return TokenizerFacts(_vocabulary(by_name, tokenizer), _added(by_name, tokenizer, config),
                          _special(by_name, config), _templates(by_name, config))


def _json(path: Path | None) -> dict:
    if path is None:
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise FormatError(f"{path}: cannot read the tokenizer file: {e.strerror or e}") from e
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{path}: tokenizer file is not valid JSON ({e}); fix it, or name the tokenizer the "
                          f"output gets with tokenizer='base' or 'adapter' (--tokenizer), which skips the "
                          f"comparison") from e
    if not isinstance(value, dict):
        raise FormatError(f"{path}: tokenizer file must be a JSON object, found {type(value).__name__}")
    return value


def _vocabulary(by_name: dict[str, Path], tokenizer: dict) -> object:
    model = tokenizer.get("model")
    if isinstance(model, dict):
        return (model.get("type"), _plain(model.get("vocab")), _merges(model.get("merges") or []))
    if "vocab.json" in by_name:
        return ("BPE", _plain(_json(by_name["vocab.json"])), _merges(_merge_lines(by_name.get("merges.txt"))))
    if "vocab.txt" in by_name:
        lines = by_name["vocab.txt"].read_text(encoding="utf-8").splitlines()
        return ("WordPiece", {token: i for i, token in enumerate(lines)}, ())
    if "tokenizer.model" in by_name:
        return ("sentencepiece", sha256_file(by_name["tokenizer.model"]))
    return None


def _merge_lines(path: Path | None) -> list[str]:
    if path is None:
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    return [line for line in lines if line and not line.startswith("#version")]


def _merges(merges: list) -> tuple[tuple[str, ...], ...]:
    """Merges written "a b" (tokenizers < 0.20) or ["a", "b"] (later) as pairs."""
    return tuple(tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in merges)


def _plain(value: object) -> object:
    """A JSON value with lists turned into tuples, so a Unigram vocabulary compares as a value."""
    if isinstance(value, list):
        return tuple(_plain(v) for v in value)
    return value


def _added(by_name: dict[str, Path], tokenizer: dict, config: dict) -> dict[int, tuple[str, bool]]:
    if isinstance(tokenizer.get("added_tokens"), list):
        return {t["id"]: (t.get("content"), bool(t.get("special"))) for t in tokenizer["added_tokens"]
                if isinstance(t, dict) and isinstance(t.get("id"), int)}
    decoder = config.get("added_tokens_decoder")
    if isinstance(decoder, dict):
        return {int(i): (t.get("content"), bool(t.get("special"))) for i, t in decoder.items()
                if isinstance(t, dict) and str(i).isdecimal()}
    if "added_tokens.json" in by_name:
        return {i: (content, False) for content, i in _json(by_name["added_tokens.json"]).items()
                if isinstance(i, int)}
    return {}


def _special(by_name: dict[str, Path], config: dict) -> dict[str, object]:
    found: dict[str, object] = {}
    for source in (config, _json(by_name.get("special_tokens_map.json"))):
        for key in SPECIAL_KEYS:
            if source.get(key) is not None:
                found[key] = _content(source[key])
        for key in EXTRA_KEYS:
            if source.get(key):
                found["additional_special_tokens"] = _content(source[key])
    return found


def _content(token: object) -> object:
    """A special token written as a string, an AddedToken dict, or a list of them: its text."""
    if isinstance(token, dict):  # an AddedToken, or transformers 5's named extra tokens
        return token["content"] if "content" in token else tuple(sorted((k, _content(v)) for k, v in token.items()))
    if isinstance(token, list):
        return tuple(_content(t) for t in token)
    return token


def _templates(by_name: dict[str, Path], config: dict) -> dict[str, str]:
    if "chat_template.jinja" in by_name:
        return {"default": by_name["chat_template.jinja"].read_text(encoding="utf-8")}
    template = _json(by_name["chat_template.json"]).get("chat_template") if "chat_template.json" in by_name \
        else config.get("chat_template")
    if isinstance(template, str):
        return {"default": template}
    if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
        return {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
    return {}


def identity(choice: TokenizerChoice | None, digest: Callable[[Path], str] = sha256_file) -> TokenizerRecord | None:
    """For the manifest: the tokenizer files the output takes from the adapter or a folder, by `digest`
    (SHA-256; None for the base's, which are identified with the base's other files)."""
    if choice is None or choice.source == "base":
        return None
    return TokenizerRecord(choice.source, {p.name: digest(p) for p in choice.files})
