"""Files/s for writing tags into 1,000 JPEGs, with baselines measured in the same run.

    .venv/bin/python bench/metadata_write.py [--files 1000] [--size 1024] [--repeat 3] [--before REF]

Each repeat measures every row on fresh copies of the same JPEGs (8 tags into dc:subject and
lr:hierarchicalSubject; for ramcli 8 of 40 tags that vary per photo, the ledger in an index
database), so baselines and ramcli share the machine's load of that moment:

- ExifTool baselines: a new `exiftool` process per file; one stay_open process, one file per
  command (both on a sample of files); one stay_open command per 64 files with the same fixed
  values for all (ExifTool's write alone: no read, no merge, no ledger; the ceiling of one process).
- ramcli `MetadataWriter` (read, merge, JSON import, ledger staged and settled):
  - one `write_batch` call per 64 photos, the way `ramcli tag` calls it (nothing overlaps);
  - one call for all photos, the way `ramcli write` calls it (each next batch is read while the
    previous one is written);
  - the re-run with nothing to change.
- `--before REF`: also the writer of that git commit (its ramcli/metadata.py, loaded beside the
  current one), one call for all photos: before/after in the same run.

Goal: ramcli's one-call row >= 80 files/s. Prints the load average, which matters on a shared box.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from _common import load_average
from ramcli.library.index import Index
from ramcli.library.ledger import Ledger
import ramcli.metadata
from ramcli.tagging.records import TagScore

TAGS = [TagScore(n, "", 0.9) for n in ("dog", "beach", "sunset", "person", "sky", "sand", "water", "tree")]
VOCABULARY = [TagScore(f"tag{i:02d}", "", 0.9) for i in range(40)]
FIXED_ARGS = [f"-XMP-dc:Subject+={t.name}" for t in TAGS] + [f"-XMP-lr:HierarchicalSubject+=auto|{t.name}" for t in TAGS]
BATCH = 64
GOAL = 80.0


def make_jpegs(folder: Path, count: int, size: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
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
        subprocess.run(["exiftool", "-q", "-overwrite_original", *FIXED_ARGS, str(p)], check=True)
    return len(paths) / (time.perf_counter() - start)


def stay_open(paths: list[Path], per_call: int) -> float:
    import exiftool

    with exiftool.ExifTool() as et:
        start = time.perf_counter()
        for i in range(0, len(paths), per_call):
            et.execute("-overwrite_original", *FIXED_ARGS, *map(str, paths[i : i + per_call]))
        return len(paths) / (time.perf_counter() - start)


def photo_tags(i: int) -> list[TagScore]:
    """8 tags per photo that differ from photo to photo, as real tagging results do (per-file
    values are what ExifTool's JSON import costs)."""
    return [VOCABULARY[(i * 7 + k * 5) % len(VOCABULARY)] for k in range(8)]


def ramcli_writer(module, paths: list[Path], db: Path, per_call: int, rerun: bool = False) -> tuple[float, float | None]:
    """files/s of the first write (and of the no-op re-run), calling write_batch per `per_call` photos."""
    items = [(p, photo_tags(i)) for i, p in enumerate(paths)]
    index = Index.open(db)  # the ledger lives in the index database (WAL), as in `ramcli tag`
    with index, module.MetadataWriter(module.WriterOptions(), Ledger(index.db)) as writer:
        start = time.perf_counter()
        outcomes = [o for i in range(0, len(items), per_call) for o in writer.write_batch(items[i : i + per_call])]
        first = len(paths) / (time.perf_counter() - start)
        assert all(o.status == "written" for o in outcomes), [o.error for o in outcomes if o.error][:3]
        if not rerun:
            return first, None
        start = time.perf_counter()
        again = writer.write_batch(items)
        second = len(paths) / (time.perf_counter() - start)
        assert all(o.status == "unchanged" for o in again)
    return first, second


def load_before(ref: str):
    """ramcli/metadata.py as it was at `ref`, as a module of its own."""
    repo = Path(__file__).resolve().parents[1]
    try:
        source = subprocess.run(["git", "-C", str(repo), "show", f"{ref}:ramcli/metadata.py"],
                                capture_output=True, text=True, check=True).stdout
    except subprocess.CalledProcessError as exc:
        sys.exit(f"--before {ref}: {exc.stderr.strip()}")
    path = Path(tempfile.mkdtemp(prefix="ramcli-before-")) / "metadata_before.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("metadata_before", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=1000)
    parser.add_argument("--baseline-files", type=int, default=50, help="files for the two slow baselines")
    parser.add_argument("--size", type=int, default=1024, help="JPEG width/height in pixels")
    parser.add_argument("--repeat", type=int, default=3, help="measure everything this many times")
    parser.add_argument("--before", metavar="REF", help="also measure the writer of this git commit")
    args = parser.parse_args()
    before = load_before(args.before) if args.before else None
    current = ramcli.metadata
    results: dict[str, list[float]] = {}
    counts: dict[str, int] = {}

    def add(name: str, n: int, rate: float) -> None:
        results.setdefault(name, []).append(rate)
        counts[name] = n

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        os.environ["RAMCLI_HOME"] = str(root / "home")  # the writer's journal: never the user's home
        source = make_jpegs(root / "src", args.files, args.size)
        mb = sum(p.stat().st_size for p in source) / len(source) / 1e6

        def fresh(name: str, count: int | None = None) -> list[Path]:
            folder = root / name
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            for p in source[:count]:
                shutil.copyfile(p, folder / p.name)
            return sorted(folder.glob("*.jpg"))

        for r in range(args.repeat):
            print(f"repeat {r + 1}/{args.repeat}, load average {load_average()}", flush=True)
            add("exiftool process per file", args.baseline_files, per_process(fresh("a", args.baseline_files)))
            add("stay_open, 1 file per call", args.baseline_files, stay_open(fresh("b", args.baseline_files), 1))
            add(f"stay_open, {BATCH} files per call, fixed", args.files, stay_open(fresh("c"), BATCH))
            if before is not None:
                add(f"ramcli BEFORE ({args.before}), one call", args.files,
                    ramcli_writer(before, fresh("d"), root / f"before{r}.db", args.files)[0])
            add(f"ramcli, one call per {BATCH} (tag)", args.files,
                ramcli_writer(current, fresh("e"), root / f"per{r}.db", BATCH)[0])
            first, rerun = ramcli_writer(current, fresh("f"), root / f"all{r}.db", args.files, rerun=True)
            add("ramcli, one call (write)", args.files, first)
            add("ramcli re-run (no-op)", args.files, rerun)
    print(f"\nJPEG {args.size}x{args.size}, {mb:.2f} MB each, 8 tags -> dc:subject + lr:hierarchicalSubject; "
          f"load average now {load_average()}")
    print(f"{'mode':40s} {'files':>6s} {'median':>8s}   each run (files/s)")
    for name, rates in results.items():
        each = " ".join(f"{x:6.1f}" for x in rates)
        print(f"{name:40s} {counts[name]:6d} {statistics.median(rates):8.1f}   {each}")
    met = statistics.median(results["ramcli, one call (write)"]) >= GOAL
    print(f"goal >= {GOAL:.0f} files/s (median, one call): {'met' if met else 'NOT met'}")


if __name__ == "__main__":
    main()
