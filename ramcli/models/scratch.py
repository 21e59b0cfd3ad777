"""Private working folders in RAMCLI_HOME/tmp for the model converters and quantisers, and the
removal of those that a killed run left behind.

ONNX Runtime's quantiser, the ONNX exporter and OpenVINO's serializer write files beside their
input or output, so each works in a folder of its own (`private_folder`: mode 0700, a fresh
name), and only finished files leave it. A run killed mid-way (converting a Swin-L takes
minutes) leaves its folder behind, gigabytes of it; the next `ramcli tag` (as it loads its
model) and the next run that needs a folder remove such folders first (`remove_abandoned`).

A folder is known as ramcli's by its name (`PURPOSE-PID-xxxxxxxx`, one of PURPOSES) and as
abandoned by its lock: a live folder holds an exclusive lock on its `lock` file for as long as
it is used, which the operating system releases when the process ends, however it ends.
Anything else in tmp/ (a link, a file, another user's folder, a name of another pattern, a
folder touched in the last minute) is left alone.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

from ramcli.config import home
from ramcli.fileio import lock_file

PURPOSES = ("onnx-export", "onnx-int8", "openvino-ir")
NAME = re.compile(rf"^(?:{'|'.join(map(re.escape, PURPOSES))})-[0-9]+-[a-z0-9_]{{8}}$")
LOCK = "lock"
#: A folder changed this recently is never removed: its owner may not hold its lock yet.
GRACE_SECONDS = 60


def scratch_root() -> Path:
    return home().root / "tmp"


@contextlib.contextmanager
def private_folder(purpose: str):
    """A new folder in RAMCLI_HOME/tmp that only this process uses, removed with everything in
    it when the block ends; abandoned ones are removed first."""
    if purpose not in PURPOSES:
        raise ValueError(f"unknown scratch purpose {purpose!r}")
    root = scratch_root()
    root.mkdir(parents=True, exist_ok=True)
    remove_abandoned(root)
    folder = Path(tempfile.mkdtemp(prefix=f"{purpose}-{os.getpid()}-", dir=root))
    try:
        with open(folder / LOCK, "w") as lock:
            lock_file(lock)
            yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def remove_abandoned(root: Path | None = None) -> list[Path]:
    """Remove the private folders in `root` whose owner has ended; the removed folders."""
    root = scratch_root() if root is None else Path(root)
    try:
        entries = list(os.scandir(root))
    except OSError:
        return []
    removed = []
    for entry in entries:
        if not NAME.match(entry.name) or not entry.is_dir(follow_symlinks=False):
            continue
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if hasattr(os, "getuid") and st.st_uid != os.getuid():
            continue
        if time.time() - st.st_mtime < GRACE_SECONDS or _locked(Path(entry.path)):
            continue
        shutil.rmtree(entry.path, ignore_errors=True)
        removed.append(Path(entry.path))
    return removed


def _locked(folder: Path) -> bool:
    """Whether a live process holds the folder's lock (a lock file that is missing or a link
    belongs to nobody)."""
    try:
        fd = os.open(folder / LOCK, os.O_RDWR | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        return False
    except OSError:
        return not (folder / LOCK).is_symlink()
    with os.fdopen(fd, "r+") as fh:
        try:
            lock_file(fh, wait=False)
        except OSError:
            return True
    return False
