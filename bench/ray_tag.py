"""`ramcli tag --ray` against the local pipeline on one machine, and scaling with CPU actors.

Random-weight RAM (official layout), a folder of generated photo-like JPEGs. Every row tags the
same photos with the same precision and batch size through the library API of `ramcli tag`
(`TagSession`, `--no-write --no-index`, results to /dev/null), in this one process, and reports the
wall time of the whole run: discovery, model loading (with Ray also the actors' start and the
model's trip through the object store) and tagging. Starting Ray itself is not timed.

  local     : `ramcli tag` (decode in-process below 4 cores, the model in the main process)
  ray xN    : `ramcli tag --ray --ray-actors N --ray-actor-cpus C`: N model actors of C CPUs,
              decode in Ray tasks. Ray is started once with N_max * C + 1 logical CPUs, a one-node
              "cluster" with a CPU left for decoding (a simulated cluster: several Ray worker
              processes on this machine).

    .venv/bin/python bench/ray_tag.py [--arch ram_swin_large_384|ram_tiny] [--images 24]
        [--precision bf16] [--batch-size 4] [--actors 1,2] [--actor-cpus 1]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from _common import CACHE, checkpoint, jpegs, load_average


def timed(run_it) -> float:
    started = time.perf_counter()
    failed = run_it()
    assert failed == 0, f"{failed} photos failed"
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="ram_swin_large_384")
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--size", default="1600x1200", help="photo size WxH")
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--actors", default="1,2", help="CPU actor counts to time, comma-separated")
    parser.add_argument("--actor-cpus", type=int, default=1)
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.split("x"))
    weights, labels = checkpoint(args.arch)
    photos = jpegs(CACHE / f"ray_photos_{args.size}", args.images, (width, height), quality=90)
    counts = [int(v) for v in args.actors.split(",")]

    from ramcli.tagging import on_ray as ray_tag
    from ramcli.tagging.options import TagOptions
    from ramcli.tagging.ray_cluster import import_ray
    from ramcli.tagging.session import TagSession

    os.environ["RAMCLI_HOME"] = str(CACHE / "ray_home")

    def run() -> TagOptions:
        return TagOptions(paths=list(photos), weights=str(weights), labels=labels, precision=args.precision,
                          batch_size=args.batch_size, use_index=False, write=False, fmt="jsonl",
                          output=Path(os.devnull), quiet=True)

    def local() -> int:
        with TagSession(run()) as session:
            return session.execute()

    cores = len(os.sched_getaffinity(0))
    print(f"{args.arch} (random weights), {args.images} photos {args.size}, --precision {args.precision}, "
          f"batch {args.batch_size}; {cores} cores; load before: {load_average()}", flush=True)
    rows = [("local", timed(local))]
    ray = import_ray()
    ray.init(num_cpus=max(counts) * args.actor_cpus + 1, include_dashboard=False, log_to_driver=False)
    for n in counts:
        seconds = timed(lambda: ray_tag.execute(run(), [str(p) for p in photos], actors=n,
                                                actor_cpus=args.actor_cpus))
        rows.append((f"ray x{n} ({args.actor_cpus} CPU each)", seconds))
    ray.shutdown()
    base = args.images / rows[0][1]
    print(f"{'run':<24} {'seconds':>8} {'img/s':>7} {'vs local':>8}")
    for name, seconds in rows:
        rate = args.images / seconds
        print(f"{name:<24} {seconds:>8.1f} {rate:>7.2f} {rate / base:>7.2f}x")
    print(f"load after: {load_average()}")


if __name__ == "__main__":
    main()
