"""Map the adapter's in-model tensor names to the base checkpoint's on-disk names.

Usually they are the same. Vision-language and audio models are the exception: transformers 5 holds the
language model under `model.language_model.` and the towers under `model.visual.` / `model.audio_tower.`,
while many checkpoints store them as `model.`, `visual.`, `audio_tower.` or `language_model.model.`.
An adapter is written with the in-memory names, so it needs the same set of renames transformers applies
when it loads that checkpoint (see `architectures.RENAME_SETS`).

Candidates are tried in tiers, and the first tier in which some candidate lands every adapter target on a
base tensor decides: no rename; the sets known for the base's model type; every other known set; one
single prefix rename. An explicit `key_map` (prefix -> prefix) comes first in every candidate. Two
fitting candidates in one tier that map the targets differently are an error (pass `key_map`).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass

from ..errors import MismatchError
from ..inputs import architectures

# Single (in-model prefix, on-disk prefix) renames, tried last, for architectures without a known set.
KNOWN_RENAMES = (
    ("model.language_model.", "model."),
    ("model.", "model.language_model."),
    ("language_model.model.", "model."),
    ("model.", "language_model.model."),
    ("language_model.model.", "model.language_model."),
    ("model.language_model.", "language_model.model."),
    ("language_model.lm_head.", "lm_head."),
    ("lm_head.", "language_model.lm_head."),
)


@dataclass(frozen=True, slots=True)
class NameMap:
    """Prefix renames from in-model to on-disk names, applied in order; the first whose prefix matches wins."""

    renames: tuple[tuple[str, str], ...]
    _backward: tuple[tuple[str, str], ...] = ()  # (on-disk prefix, in-model prefix), longest first

    def __post_init__(self) -> None:
        backward = tuple(sorted(((new, old) for old, new in self.renames), key=lambda r: -len(r[0])))
        object.__setattr__(self, "_backward", backward)

    def __call__(self, name: str) -> str:
        for old, new in self.renames:
            if name.startswith(old):
                return new + name[len(old):]
        return name

    def inverse(self, name: str) -> str:
        """The in-model name of an on-disk name (the longest matching on-disk prefix wins)."""
        for new, old in self._backward:
            if name.startswith(new):
                return old + name[len(new):]
        return name


def resolve_names(targets: Iterable[str], exists: Callable[[str], bool], key_map: dict[str, str] | None,
                  config: dict | None, optional: Callable[[str], bool], describe: Callable[[str], str],
                  base_names: Collection[str]) -> NameMap:
    """Choose the NameMap under which every target lands on the base.

    Args:
        targets: in-model names the adapter writes to (tensors, or modules owning targeted parameters).
        exists: whether an on-disk name is a tensor (or module) of the base checkpoint.
        key_map: explicit prefix renames from the user, tried first and always kept.
        config: the base's config.json, whose model type selects the known rename sets.
        optional: targets that may be absent (a tied lm_head the merge will create).
        describe: the adapter key behind a target, for the error message.
        base_names: the base's tensor names, to suggest near misses.

    Raises:
        MismatchError: no candidate makes every target land, or two in one tier disagree.
    """
    targets = [t for t in targets if not optional(t)]
    user = tuple((key_map or {}).items())
    own = architectures.rename_sets(config)
    others = tuple(s for s in architectures.all_rename_sets() if s not in own)
    tiers = [[NameMap(user)], [NameMap(user + s) for s in own], [NameMap(user + s) for s in others],
             [NameMap(user + (r,)) for r in KNOWN_RENAMES]]
    for level, tier in enumerate(tiers):
        fitting = [c for c in tier if all(exists(c(t)) for t in targets)]
        if fitting:
            chosen = _one(fitting, targets, len(user))
            # A set known for this architecture is kept whole (it also maps names back for the check of
            # untrained targets); a guess borrowed from another architecture keeps only the renames used.
            return chosen if level < 2 else _used(chosen, targets, len(user))
    raise _no_fit(targets, NameMap(user), exists, base_names, describe)


def _one(fitting: list[NameMap], targets: list[str], n_user: int) -> NameMap:
    """The first fitting candidate, unless another one maps some target elsewhere."""
    first = fitting[0]
    rivals = [c for c in fitting[1:] if any(c(t) != first(t) for t in targets)]
    if not rivals:
        return first
    options = " or ".join(", ".join(f"{old!r} -> {new!r}" for old, new in c.renames[n_user:])
                          for c in (first, *rivals))
    raise MismatchError(f"adapter names fit the base under more than one rename ({options}); pass "
                        f"key_map / --map FROM=TO to choose")


def _used(names: NameMap, targets: list[str], n_user: int) -> NameMap:
    used = {next((r for r in names.renames if t.startswith(r[0])), None) for t in targets}
    return NameMap(names.renames[:n_user] + tuple(r for r in names.renames[n_user:] if r in used))


def _no_fit(targets: list[str], identity: NameMap, exists: Callable[[str], bool], base_names: Collection[str],
            describe: Callable[[str], str]) -> MismatchError:
    target = next(t for t in targets if not exists(identity(t)))
    missing, described = identity(target), describe(target)
    near = difflib.get_close_matches(missing, base_names, n=3, cutoff=0.5)
    hint = f"nearest base tensors: {', '.join(near)}" if near else "no base tensor has a similar name"
    return MismatchError(f"{described} targets {missing!r}, which is not in the base model ({hint}); if the "
                         f"names differ by a prefix, pass key_map / --map FROM=TO")
