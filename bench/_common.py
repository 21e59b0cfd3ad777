"""Shared helpers for the benchmarks: random-weight official-layout checkpoints and photo-like JPEGs.

Benchmarks reuse the test factories (tests/ckpt_factory.py, tests/images.py) so that what is
measured is exactly what is tested; they cache what they generate under .bench_cache/.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / ".bench_cache"
sys.path.insert(0, str(REPO / "tests"))

from ckpt_factory import make_labels_dir, make_official_checkpoint  # noqa: E402
from images import photo_like  # noqa: E402


def checkpoint(arch: str, optimizer_state: bool = False, num_classes: int | None = None) -> tuple[Path, Path]:
    """(official-layout .pth, labels dir), built once and cached: with the whole tag list of the
    arch's family, or its first `num_classes` tags (a tiny model whose cost is not its label table)."""
    CACHE.mkdir(exist_ok=True)
    family = "tag2text" if arch.startswith("tag2text") else "ram"
    n = num_classes or (3429 if family == "tag2text" else 4585)
    path = CACHE / f"{arch}{'-optim' if optimizer_state else ''}{f'-{num_classes}' if num_classes else ''}.pth"
    if not path.exists():
        print(f"building {path.name} (random weights, official layout) ...", file=sys.stderr, flush=True)
        make_official_checkpoint(path, arch, num_classes=n, optimizer_state=optimizer_state)
    return path, make_labels_dir(CACHE, n, family)


def _write_jpeg(path: Path, size: tuple[int, int], seed: int, quality: int) -> None:
    photo_like(*size, seed=seed).save(path, quality=quality)


def jpegs(folder: Path, count: int, size: tuple[int, int] = (4000, 3000), quality: int = 90) -> list[Path]:
    """Photo-like JPEGs (12 MP by default), built once and cached; the missing ones in parallel
    (a 12 MP one takes ~1.6 s, so 256 of them would eat a GPU machine's whole time slot)."""
    from concurrent.futures import ProcessPoolExecutor

    folder.mkdir(parents=True, exist_ok=True)
    out = [folder / f"img{i:04d}.jpg" for i in range(count)]
    missing = [(p, size, i, quality) for i, p in enumerate(out) if not p.exists()]
    if missing:
        with ProcessPoolExecutor() as pool:
            list(pool.map(_write_jpeg, *zip(*missing)))
    return out


def start_workers_as_ramcli() -> None:
    """In a path's own process (started with spawn, to isolate it), start decode workers the way
    `ramcli tag` does: with the platform's default start method. A spawned process inherits spawn,
    whose workers import torch and ramcli afresh (seconds) inside the timed run."""
    import multiprocessing

    multiprocessing.set_start_method(multiprocessing.get_all_start_methods()[0], force=True)


def load_average() -> str:
    """The 1, 5 and 15 minute load averages: benchmarks print them next to their numbers."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def peak_rss_mb() -> float:
    """This process's resident high-water mark since its exec (VmHWM; ru_maxrss would include the
    parent's memory that a spawned child inherits across fork + exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")
