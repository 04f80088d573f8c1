"""Map the adapter's in-model tensor names to the base checkpoint's on-disk names.

Usually they are the same. Adapters trained on a vision-language wrapper say `model.language_model.*`
where a text-only checkpoint says `model.*`, and the reverse (spec peft-semantics.md E16). We try the
identity first, then each known prefix rename, and take the one under which every adapter target exists;
an explicit `key_map` (prefix -> prefix) is applied before that. More than one fitting rename is an error.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass

from .errors import MismatchError

# (in-model prefix, on-disk prefix) pairs tried when the names do not match as they are.
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
    """Prefix renames applied, in order; the first whose prefix matches a name wins."""

    renames: tuple[tuple[str, str], ...]

    def __call__(self, name: str) -> str:
        for old, new in self.renames:
            if name.startswith(old):
                return new + name[len(old):]
        return name


def resolve_names(targets: Iterable[str], base_names: Collection[str], key_map: dict[str, str] | None,
                  optional: Callable[[str], bool], describe: Callable[[str], str]) -> NameMap:
    """Choose the NameMap under which every target lands on a base tensor.

    Args:
        targets: in-model names the adapter writes to.
        base_names: the tensors of the base checkpoint.
        key_map: explicit prefix renames from the user, tried first and always kept.
        optional: targets that may be absent (a tied lm_head the merge will create).
        describe: the adapter key behind a target, for the error message.

    Raises:
        MismatchError: no rename makes every target land, or more than one does.
    """
    targets = [t for t in targets if not optional(t)]
    user = tuple((key_map or {}).items())
    candidates = [NameMap(user)] + [NameMap(user + (r,)) for r in KNOWN_RENAMES]
    fitting = [c for c in candidates if all(c(t) in base_names for t in targets)]
    if fitting and fitting[0] is candidates[0]:
        return fitting[0]
    if len(fitting) == 1:
        return fitting[0]
    if len(fitting) > 1:
        options = " or ".join(f"{old!r} -> {new!r}" for c in fitting for old, new in c.renames[len(user):])
        raise MismatchError(f"adapter names fit the base under more than one rename ({options}); pass "
                            f"key_map / --map FROM=TO to choose")
    missing = next(t for t in targets if candidates[0](t) not in base_names)
    near = difflib.get_close_matches(candidates[0](missing), base_names, n=3, cutoff=0.5)
    hint = f"nearest base tensors: {', '.join(near)}" if near else "no base tensor has a similar name"
    raise MismatchError(f"{describe(missing)} targets {candidates[0](missing)!r}, which is not in the base model "
                        f"({hint}); if the names differ by a prefix, pass key_map / --map FROM=TO")
