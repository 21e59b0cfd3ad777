"""OpenVINO's compiled-model cache (`CACHE_DIR`) on a full-size tagger: start-up without it, the
first start with it (compile and export), later starts (import), the disk it takes, and whether
an imported copy gives the same logits. Each start is a fresh process, as a user's runs are.

    .venv/bin/python bench/openvino_cache.py --arch ram_swin_large_384 --precision bf16 --starts 3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import CACHE, checkpoint, load_average

ONE_START = """
import json, sys, time
import numpy as np, openvino as ov
xml, cache, hint, out, size = sys.argv[1:6]
core = ov.Core()
if cache != "-":
    core.set_property({"CACHE_DIR": cache})
t0 = time.perf_counter()
compiled = core.compile_model(xml, "CPU", {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": hint})
t1 = time.perf_counter()
x = np.random.default_rng(0).standard_normal((2, 3, int(size), int(size)), dtype=np.float32)
np.save(out, compiled(x)[0])
print(json.dumps({"start": t1 - t0, "first_batch": time.perf_counter() - t1}))
"""


def start(xml: Path, cache: str, hint: str, out: Path, size: int) -> dict:
    run = subprocess.run([sys.executable, "-c", ONE_START, str(xml), cache, hint, str(out), str(size)],
                         capture_output=True, text=True)
    if run.returncode != 0:  # a crash is a result here, not an error of the benchmark
        why = (run.stderr.strip().splitlines() or [""])[-1][:120]
        return {"start": float("nan"), "first_batch": float("nan"), "failed": f"exit {run.returncode} {why}"}
    return json.loads(run.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="ram_swin_large_384")
    ap.add_argument("--precision", default="bf16", choices=("fp32", "bf16"))
    ap.add_argument("--starts", type=int, default=3, help="starts importing from the cache")
    args = ap.parse_args()
    import numpy as np

    os.environ.setdefault("RAMCLI_HOME", str(CACHE / "home"))
    from ramcli.models import load_any
    from ramcli.models.openvino_runtime import cached_ir

    pth, labels = checkpoint(args.arch)
    model = load_any(pth, labels_dir=labels)
    xml, size = cached_ir(model, pth), model.arch.image_size
    hint = {"fp32": "f32", "bf16": "bf16"}[args.precision]
    print(f"{args.arch} {args.precision}, 2 photos per batch; load average {load_average()}", flush=True)
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        rows = [("no cache", start(xml, "-", hint, work / "plain.npy", size), work / "plain.npy")]
        rows.append(("cache: first start (compile, export)", start(xml, str(work / "cache"), hint, work / "0.npy", size),
                     work / "0.npy"))
        for i in range(1, args.starts + 1):
            rows.append((f"cache: start {i + 1} (import)", start(xml, str(work / "cache"), hint, work / f"{i}.npy", size),
                         work / f"{i}.npy"))
        mib = sum(f.stat().st_size for f in (work / "cache").rglob("*") if f.is_file()) / 2**20
        plain = np.load(work / "plain.npy") if (work / "plain.npy").exists() else None
        print("| start | start-up s | first batch s | max logit difference vs no cache |")
        print("|---|---:|---:|---:|")
        for name, row, out in rows:
            diff = (f"{float(np.abs(np.load(out) - plain).max()):.2g}" if out.exists() and plain is not None
                    else row.get("failed", "-"))
            print(f"| {name} | {row['start']:.1f} | {row['first_batch']:.1f} | {diff} |")
        print(f"cache on disk: {mib:.0f} MiB; load average at the end {load_average()}")
        shutil.rmtree(work / "cache", ignore_errors=True)


if __name__ == "__main__":
    main()
