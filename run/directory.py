"""A run directory: which folder a run writes to, that it never destroys an earlier run without being asked, that
no two runs write to one folder at once, and what a resumed run may change of its checkpoint's settings.

`claim` is called before any work: it picks the folder (a fresh one next to the default when that holds a run),
refuses an explicit --out that holds another run unless --overwrite (which then removes that run's files), refuses
a folder it cannot write in, and takes the folder's lock (`RunLock`) for the run's life. `check_resume` compares a
resumed run's settings with its checkpoint's before anything is written."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import click

# What a run writes in its folder (TensorBoard's event files besides): a folder holding any of them holds a run.
RUN_FILES = ("checkpoint.pt", "metrics.jsonl", "config.json", "bad_files.txt", "boxes.npy")
EVENTS = "events.out.tfevents.*"
LOCK = "train.lock"


class RunDirError(click.ClickException):
    """The run directory cannot be used: one line saying why and what to do instead."""


def run_files(folder: Path) -> list[str]:
    """The names of the run files in `folder` (`RUN_FILES`, event files), in that order; [] for none or no folder."""
    if not folder.is_dir():
        return []
    found = [name for name in RUN_FILES if (folder / name).exists()]
    return found + sorted(path.name for path in folder.glob(EVENTS))


class RunLock:
    """An exclusive lock on RUN_DIR/train.lock (fcntl.flock) held while the run lives: a second run on the folder
    is refused. The kernel releases it when the process ends, however it ends, so the file a killed run leaves
    behind never blocks. The file holds the pid of the run that holds it (for the message)."""

    def __init__(self, folder: Path, created: list[Path] | None = None) -> None:
        self.path = folder / LOCK
        self.file = None
        self.created = created or []  # the folders `claim` made, deepest first

    def acquire(self) -> None:
        """Take the lock; RunDirError when another process holds it, or when the file cannot be written."""
        try:
            descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            raise RunDirError(f"cannot write in the run directory {self.path.parent} ({why(error)})") from error
        file = os.fdopen(descriptor, "r+")
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = file.read().strip()
            file.close()
            pid = f" (pid {holder})" if holder else ""
            raise RunDirError(
                f"{self.path.parent} is in use by another run{pid}: wait for it to end, or choose another --out"
            ) from None
        file.seek(0)
        file.truncate()
        file.write(f"{os.getpid()}\n")
        file.flush()
        self.file = file

    def release(self) -> None:
        if self.file is not None:
            self.file.close()  # closing the descriptor drops the lock
            self.file = None

    def abandon(self) -> None:
        """Undo the claim of a run that stopped before writing anything: the lock file and the folders it made."""
        self.path.unlink(missing_ok=True)
        self.release()
        for folder in self.created:
            try:
                folder.rmdir()
            except OSError:  # not empty (or gone): leave it
                break

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def why(error: OSError) -> str:
    return error.strerror or str(error)


def locked(folder: Path) -> bool:
    """Whether a live run holds `folder`'s lock (a lock file a killed run left does not count)."""
    path = folder / LOCK
    if not path.exists():
        return False
    try:
        with open(path) as file:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    return False


def fresh_folder(base: Path) -> Path:
    """`base` when it holds no run and no live run holds it, else the first of BASE-2, BASE-3, ... that does not."""
    candidate, n = base, 1
    while run_files(candidate) or locked(candidate):
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    return candidate


def claim(out: Path, chosen: bool, resumed_from: Path | None, overwrite: bool, echo=click.echo) -> tuple[Path, RunLock]:
    """The folder the run writes to, created, with its lock held (release it when the run ends). `chosen`: --out
    was given (else `out` is the default, and a fresh folder beside it is used when it holds a run, the run
    saying which). A chosen folder holding a run other than the one `resumed_from` (a checkpoint's path) is
    refused unless `overwrite`, which removes that run's files once the lock is held. A folder that cannot be
    created or written in is refused. Every refusal is one line (RunDirError), before anything is written."""
    own = resumed_from is not None and out.resolve() == resumed_from.resolve().parent
    if not chosen and not own:
        picked = fresh_folder(out)
        if picked != out:
            echo(f"run directory {picked} ({out} holds an earlier run; --out chooses another)")
        out = picked
    found = [] if own else run_files(out)
    if found and not overwrite:
        resume = f"--resume {out / 'checkpoint.pt'}" if "checkpoint.pt" in found else "--resume (it has no checkpoint)"
        raise RunDirError(
            f"--out {out} holds a run ({', '.join(found)}): continue it with {resume}, replace it with --overwrite, "
            "or choose another --out"
        )
    created = [folder for folder in (out, *out.parents) if not folder.exists()]
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise RunDirError(f"cannot create the run directory {out} ({why(error)})") from error
    lock = RunLock(out, created)
    lock.acquire()
    try:
        probe = out / f".write-test-{os.getpid()}"  # the lock file may be left from before: prove a new file works
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        lock.abandon()
        raise RunDirError(f"cannot write in the run directory {out} ({why(error)})") from error
    if found:  # --overwrite, and the lock is ours: no other run is using these
        for name in found:
            (out / name).unlink(missing_ok=True)
        echo(f"--overwrite: removed the earlier run's {', '.join(found)} from {out}")
    return out, lock


# Settings a resumed run cannot change: the weights' shapes (arch, image size, queue), what is trained (the method
# and its variants, the crops, ContrastiveCrop's box source) and the schedule a resume continues exactly (the
# images, the global batch, the seed).
FIXED = (
    "arch",
    "image_size",
    "queue_size",
    "method",
    "symmetric",
    "attract_all",
    "original",
    "pairs",
    "loss_terms",
    "crop",
    "ccrop_boxes",
    "train_limit",
    "batch_size",
    "seed",
)
WHY_FIXED = {
    "arch": "the weights' shapes",
    "image_size": "the weights' shapes (the stem) and every crop window",
    "queue_size": "the queue's size",
    "train_limit": "which images are trained on",
    "batch_size": "the schedule the checkpoint stands in",
    "seed": "the schedule the checkpoint stands in",
}
IGNORED = ("out", "amp_auto", "world_size")  # where the run writes; results of the run, not settings


def check_resume(saved: Mapping[str, Any], settings: Mapping[str, Any], changed: Iterable[str]) -> list[str]:
    """A resumed run's settings (`settings`, flat, resolved) against its checkpoint's (`saved`): for each setting in
    `changed` (those given on the command line or in --config) whose value differs, RunDirError (one line naming
    the option) when it is in `FIXED`, else a line saying what changes. Returns those lines."""
    notes = []
    for name in sorted(set(changed)):
        if name in IGNORED or name not in settings or name not in saved:
            continue
        old, new = saved[name], settings[name]
        if old == new or str(old) == str(new) or name == "amp" and new == "auto":
            continue  # amp auto chooses again on the machine that resumes
        option = "--" + name.replace("_", "-")
        if name in FIXED:
            reason = WHY_FIXED.get(name, "what the run trains")
            raise RunDirError(
                f"--resume cannot change {option} ({old} in the checkpoint, {new} given: it fixes {reason}); "
                f"start a new run with --out, or resume without {option}"
            )
        notes.append(f"{option} {old} -> {new}")
    return notes
