"""The training files a checkpoint was trained on, recorded so a resume notices when they changed.

A resume continues the data stream at a saved position (``trainer_state.json``'s ``data``): the
position of a row in a file. When the file changed since the save (rows added, removed, edited),
the same position means other rows, silently. So every checkpoint records, per task, the training
file's path, size, modification time and xxh3-128 digest, and the resume compares them before the
model is built. A file that only moved or was copied (same bytes, another mtime) is not a change.

Owns the record and the comparison; the trainer says which files (``find_split_file`` of each
task's training split) and the manager stores the record in the ``COMPLETE`` marker.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from hp_deepspeed.checkpointing.integrity import digest_file


def describe(path: str | Path, known: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``{"path", "size", "mtime_ns", "digest"}`` of ``path``; the digest is taken from ``known``
    (an earlier record) when size and mtime still match, so repeated saves read nothing."""
    stat = Path(path).stat()
    if known and known.get("path") == str(path) and known.get("size") == stat.st_size \
            and known.get("mtime_ns") == stat.st_mtime_ns:
        return dict(known)
    size, digest = digest_file(path)
    return {"path": str(path), "size": size, "mtime_ns": stat.st_mtime_ns, "digest": digest}


def changes(saved: Mapping[str, Mapping[str, Any]], current: Mapping[str, str | Path]) -> list[str]:
    """What changed, per task, between the files a checkpoint recorded and the job's files now."""
    problems = []
    for task, record in sorted(saved.items()):
        if task not in current:
            continue  # a task the job no longer trains is refused by the model config check
        path = Path(current[task])
        try:
            now = describe(path, record)
        except FileNotFoundError:
            problems.append(f"training file of {task}: {path} does not exist any more")
            continue
        if now["size"] != record["size"]:
            problems.append(f"training file of {task}: {path} has {now['size']} bytes, "
                            f"{record['size']} when the checkpoint was saved")
        elif now["digest"] != record["digest"]:
            problems.append(f"training file of {task}: {path} has the same size but other content than "
                            "when the checkpoint was saved")
    return problems
