"""The first minutes of a new user, timed: clone, venv, `pip install .`, then tag a folder.

What a user with only Python and ExifTool does, from a fresh clone into a temporary folder:

    git clone REPO && python3 -m venv venv && venv/bin/pip install .
    venv/bin/ramcli tag PHOTOS --weights FILE

The weights file stands for the one the user already has (a random-weight RAM checkpoint in
the official layout, from tests/ckpt_factory.py, with the official 4,585 classes); building it
is timed but not counted as set-up. pip runs without its cache (`--no-cache-dir`), as on a new
machine, but with this machine's own pip configuration (a local wheel cache, a version cap):
what it installs is printed, so a CUDA build of torch does not go unnoticed.

Stdlib only, run with the Python a user has:  python3 bench/first_run.py [--photos N] [--keep]
The temporary folder (several GB with a CUDA torch) is deleted at the end unless --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
#: The set-up a new user should get through: clone, venv and install.
TARGET_S = 180

_PHOTOS = """
import sys
from pathlib import Path
import numpy as np
from PIL import Image
out, n = Path(sys.argv[1]), int(sys.argv[2])
out.mkdir()
rng = np.random.default_rng(0)
for i in range(n):
    y, x = np.mgrid[0:480, 0:640]
    base = np.stack([(x * (i + 1)) % 256, (y * 3 + 40 * i) % 256, ((x + y) // 2) % 256], axis=-1)
    noise = rng.integers(0, 40, size=base.shape)
    Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)).save(out / f"photo_{i:02d}.jpg", quality=90)
"""

_INSTALLED = """
import importlib.metadata as md, json, torch
names = sorted(d.metadata["Name"] for d in md.distributions())
print(json.dumps({"torch": torch.__version__, "cuda": torch.version.cuda, "packages": len(names),
                  "nvidia": [n for n in names if n.lower().startswith("nvidia")]}))
"""


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


#: CPU seconds (user + system, all child processes) of each command `timed` ran, by its `what`:
#: on a busy shared machine the wall-clock time says more about the others than about ramcli.
CPU: dict[str, float] = {}


def timed(what: str, args: list[str], log: Path, **kwargs) -> tuple[float, subprocess.CompletedProcess]:
    start, cpu = time.perf_counter(), _children_cpu()
    done = subprocess.run(args, capture_output=True, text=True, **kwargs)
    seconds = time.perf_counter() - start
    CPU[what] = _children_cpu() - cpu
    with log.open("a") as fh:
        fh.write(f"$ {' '.join(args)}\n{done.stdout}{done.stderr}\n")
    if done.returncode != 0:
        sys.exit(f"first_run: {what} failed (exit {done.returncode}); log: {log}\n{done.stderr[-2000:]}")
    return seconds, done


def folder_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def cpu_flags() -> str:
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return "unknown"
    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8")
    return " ".join(f for f in wanted if f in flags.split())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", type=Path, default=REPO, help="the repository to clone (default: this one)")
    parser.add_argument("--photos", type=int, default=8, help="JPEGs to tag (default 8)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args()
    if shutil.which("exiftool") is None:
        sys.exit("first_run: ExifTool is not installed (the one tool besides Python that a user needs)")

    work = Path(tempfile.mkdtemp(prefix="ramcli-first-run-"))
    log = work / "log.txt"
    clone, venv = work / "ramcli", work / "venv"
    py, ramcli = venv / "bin" / "python", venv / "bin" / "ramcli"
    env = {**os.environ, "RAMCLI_HOME": str(work / "home"), "PIP_NO_CACHE_DIR": "1"}
    env.pop("PYTHONPATH", None)
    env.pop("VIRTUAL_ENV", None)
    rows: list[tuple[str, float, float, str]] = []
    load_before = os.getloadavg()[0]
    try:
        seconds, _ = timed("git clone", ["git", "clone", "--quiet", str(args.repo), str(clone)], log)
        rows.append(("git clone (local disk)", seconds, CPU["git clone"], "a clone over the network adds its download"))
        seconds, _ = timed("venv", [sys.executable, "-m", "venv", str(venv)], log)
        rows.append(("python3 -m venv", seconds, CPU["venv"], ""))
        seconds, _ = timed("pip install", [str(py), "-m", "pip", "install", "."], log, cwd=clone, env=env)
        info = json.loads(timed("inspect", [str(py), "-c", _INSTALLED], log, env=env)[1].stdout)
        build = f"CUDA {info['cuda']} build" if info["cuda"] else "CPU build"
        rows.append(("pip install .", seconds, CPU["pip install"],
                     f"torch {info['torch']} ({build}, {len(info['nvidia'])} nvidia wheels), "
                     f"{info['packages']} packages, venv {folder_size(venv) / 2**30:.1f} GiB"))
        setup, setup_cpu = sum(r[1] for r in rows), sum(r[2] for r in rows)

        weights = work / "ram_tiny.pth"
        factory = (f"import sys; sys.path.insert(0, {str(clone / 'tests')!r}); "
                   f"from ckpt_factory import make_official_checkpoint as m; m({str(weights)!r}, 'ram_tiny')")
        seconds, _ = timed("weights file", [str(py), "-c", factory], log, env=env)
        weights_row = ("the user's weights file", seconds, CPU["weights file"],
                       f"not set-up: random RAM weights, official layout, {weights.stat().st_size / 2**20:.0f} MiB")
        photos = work / "photos"
        timed("photos", [str(py), "-c", _PHOTOS, str(photos), str(args.photos)], log, env=env)

        seconds, _ = timed("ramcli --help", [str(ramcli), "--help"], log, env=env)
        help_row = ("ramcli --help", seconds, CPU["ramcli --help"], "")
        seconds, done = timed("ramcli tag", [str(ramcli), "tag", str(photos), "--weights", str(weights)], log, env=env)
        tagged = sum(1 for line in done.stdout.splitlines() if line.strip())
        tag_row = ("ramcli tag PHOTOS --weights FILE", seconds, CPU["ramcli tag"], f"{tagged} of {args.photos} photos, first run")
        seconds, _ = timed("ramcli tag (again)", [str(ramcli), "tag", str(photos), "--weights", str(weights),
                                                  "--force"], log, env=env)
        again_row = ("the same, again (--force)", seconds, CPU["ramcli tag (again)"], "")

        print(f"first run of {args.repo} on {platform.machine()}, Python {platform.python_version()}, "
              f"{os.cpu_count()} CPUs ({cpu_flags()}), load average {load_before:.2f} before, "
              f"{os.getloadavg()[0]:.2f} after")
        print(f"  {'':34s} {'wall':>7s}    {'CPU':>7s}")
        for name, seconds, cpu, note in [*rows, ("set-up (clone + venv + install)", setup, setup_cpu,
                                                 f"target: under {TARGET_S} s"), weights_row, help_row, tag_row,
                                         again_row]:
            print(f"  {name:34s} {seconds:7.1f} s  {cpu:7.1f} s  {note}")
        if info["nvidia"]:
            print("  note: a bare `pip install .` picked a CUDA build of torch on this CPU-only machine;\n"
                  "  installing torch from PyTorch's CPU index first avoids it (see the README).")
    finally:
        if args.keep:
            print(f"kept {work} (log: {log})")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
