"""Files/s for writing tags into 1,000 JPEGs, with baselines measured in the same run.

    .venv/bin/python bench/metadata_write.py [--files 1000] [--size 1024]

Rows: (1) a new `exiftool` process per file, (2) one stay_open process, one file per command
(both measured on a sample of files and reported per file), (3) ramcli's MetadataWriter
(batched read + JSON import + verify, ledger updates included), (4) its no-op re-run.
Goal: (3) >= 80 files/s.
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import sqlite_utils
from PIL import Image

from ramcli.ledger import Ledger
from ramcli.metadata import MetadataWriter, WriterOptions
from ramcli.records import TagScore

TAGS = [TagScore(n, "", 0.9) for n in ("dog", "beach", "sunset", "person", "sky", "sand", "water", "tree")]


def make_jpegs(folder: Path, count: int, size: int) -> list[Path]:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    paths = []
    for i in range(count):
        path = folder / f"img_{i:05d}.jpg"
        Image.fromarray(np.roll(base, i, axis=1)).save(path, quality=90)
        paths.append(path)
    return paths


def per_process(paths: list[Path]) -> float:
    start = time.perf_counter()
    for p in paths:
        args = [f"-XMP-dc:Subject+={t.name}" for t in TAGS] + [f"-XMP-lr:HierarchicalSubject+=auto|{t.name}" for t in TAGS]
        subprocess.run(["exiftool", "-q", "-overwrite_original", *args, str(p)], check=True)
    return len(paths) / (time.perf_counter() - start)


def stay_open_one_per_call(paths: list[Path]) -> float:
    import exiftool

    args = [f"-XMP-dc:Subject+={t.name}" for t in TAGS] + [f"-XMP-lr:HierarchicalSubject+=auto|{t.name}" for t in TAGS]
    with exiftool.ExifTool() as et:
        start = time.perf_counter()
        for p in paths:
            et.execute("-overwrite_original", *args, str(p))
        return len(paths) / (time.perf_counter() - start)


def ramcli_writer(paths: list[Path], db: Path) -> tuple[float, float]:
    with MetadataWriter(WriterOptions(), Ledger(sqlite_utils.Database(db))) as writer:
        items = [(p, TAGS) for p in paths]
        start = time.perf_counter()
        outcomes = writer.write_batch(items)
        first = len(paths) / (time.perf_counter() - start)
        assert all(o.status == "written" for o in outcomes), [o.error for o in outcomes if o.error][:3]
        start = time.perf_counter()
        again = writer.write_batch(items)
        rerun = len(paths) / (time.perf_counter() - start)
        assert all(o.status == "unchanged" for o in again)
    return first, rerun


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=1000)
    parser.add_argument("--baseline-files", type=int, default=50, help="files for the two slow baselines")
    parser.add_argument("--size", type=int, default=1024, help="JPEG width/height in pixels")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "a").mkdir()
        (folder / "b").mkdir()
        (folder / "c").mkdir()
        main_set = make_jpegs(folder / "a", args.files, args.size)
        mb = sum(p.stat().st_size for p in main_set) / len(main_set) / 1e6
        base1 = make_jpegs(folder / "b", args.baseline_files, args.size)
        base2 = make_jpegs(folder / "c", args.baseline_files, args.size)
        rows = [
            ("exiftool process per file", len(base1), per_process(base1)),
            ("stay_open, 1 file per call", len(base2), stay_open_one_per_call(base2)),
        ]
        first, rerun = ramcli_writer(main_set, folder / "index.db")
        rows += [("ramcli MetadataWriter (batch 64)", len(main_set), first),
                 ("ramcli re-run (no-op)", len(main_set), rerun)]
    print(f"JPEG {args.size}x{args.size}, {mb:.2f} MB each, 8 tags -> dc:subject + lr:hierarchicalSubject")
    print(f"{'mode':36s} {'files':>6s} {'files/s':>9s}")
    for name, n, rate in rows:
        print(f"{name:36s} {n:6d} {rate:9.1f}")
    print(f"goal >= 80 files/s: {'met' if first >= 80 else 'NOT met'}")


if __name__ == "__main__":
    main()
