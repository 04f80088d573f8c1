"""The local folder an output is written into: whether it already holds this merge (for `resume`)."""

from __future__ import annotations

from pathlib import Path

from ..errors import OutputError
from ..files import MANIFEST_NAME
from ..planning.manifest import MergeIdentity, differences, read_manifest
from .output import partial_folder_of


def finished_merge(dest: Path, ident: MergeIdentity) -> bool:
    """For `resume`: whether `dest` holds a finished merge of exactly these inputs and options, so there
    is nothing to do. False when an interrupted run's folder waits beside it, or `dest` is empty or
    absent (a fresh start). Any other content is an OutputError naming what differs — another merge's
    manifest, a listed shard missing, no manifest at all — as resuming cannot turn it into this merge
    (a manifest that cannot be read is a FormatError)."""
    if partial_folder_of(dest).exists() or not dest.is_dir() or not any(dest.iterdir()):
        return False
    found = read_manifest(dest)
    if found is None:
        raise OutputError(f"{dest}: destination folder is not empty and holds no finished merge (no {MANIFEST_NAME}), "
                          f"so there is nothing to resume; pass overwrite=True (--overwrite) to replace it")
    if changes := differences(found.identity, ident):
        raise OutputError(f"{dest}: holds a finished merge of other inputs or options ({'; '.join(changes)}), "
                          f"so there is nothing to resume; pass overwrite=True (--overwrite) to replace it")
    for name, shard in found.shards.items():
        if not (dest / name).is_file() or (dest / name).stat().st_size != shard.size:
            raise OutputError(f"{dest / name}: the finished merge lists this shard but it is missing or has the "
                              f"wrong size; pass overwrite=True (--overwrite) to merge again")
    return True
