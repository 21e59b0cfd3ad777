"""Benchmark of the index and `ramcli search` at library scale.

Builds an index of N photos x ~12 tags through the real insert path (`Index.record_batch`, one
transaction per batch), then times the four query types and prints p50/p95 latency, side by side
with a baseline measured in the same run: the same queries scored exhaustively (every hit
scored, then sorted), i.e. without the threshold algorithm's early stop. The load average is
printed before and after, because the numbers mean little on a busy machine without it.

Tag popularity is Zipf-like (a few tags such as 'person' or 'outdoor' on a large share of the
library, a long tail of rare ones), and query tags are drawn with the same popularity, because
people search for common things: this is the hard case for AND/NOT queries.

    .venv/bin/python bench/search.py                 # 1,000,000 photos (about 5 minutes on 2 cores)
    .venv/bin/python bench/search.py --photos 50000  # quick run
    .venv/bin/python bench/search.py --db /tmp/1m.db # keep the index; a rerun reuses it (no build)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from _common import load_average  # noqa: E402
from ramcli.library.index import Index  # noqa: E402
from ramcli.models.labels import official_dir  # noqa: E402
from ramcli.tagging.records import PhotoResult, TagScore  # noqa: E402
from ramcli.library.search import photo_tags_by_id, search  # noqa: E402

OFFICIAL_TAGS = official_dir() / "ram_tag_list.txt"


def vocabulary(n: int) -> list[str]:
    names = [line.strip() for line in OFFICIAL_TAGS.read_text(encoding="utf-8").splitlines() if line.strip()]
    return names[:n] + [f"tag{i:04d}" for i in range(n - len(names[:n]))]


def build(index: Index, n_photos: int, names: list[str], per_photo: int, batch: int, rng) -> float:
    weights = 1.0 / np.arange(1, len(names) + 1) ** 0.9
    weights /= weights.sum()
    order = rng.permutation(len(names))  # popularity rank -> tag, so popular tags are not alphabetical
    start = time.perf_counter()
    for first in range(0, n_photos, batch):
        count = min(batch, n_photos - first)
        draws = order[rng.choice(len(names), size=(count, per_photo * 3), p=weights)]
        scores = 0.65 + 0.35 * rng.beta(2.0, 3.0, size=(count, per_photo))
        results = []
        for row in range(count):
            tags = list(dict.fromkeys(draws[row].tolist()))[:per_photo]
            i = first + row
            results.append(
                PhotoResult(
                    path=f"/photos/{i // 1000:04d}/IMG_{i:07d}.jpg",
                    status="tagged",
                    size=2_000_000 + i,
                    mtime_ns=1_700_000_000_000_000_000 + i,
                    content_hash=f"{i:016x}",
                    model_id="ram_plus_swin_large_14m",
                    vocab_version="bench",
                    tags=[TagScore(names[t], "", float(s)) for t, s in zip(tags, scores[row])],
                )
            )
        index.record_batch(results)
        done = first + count
        if done % (batch * 20) == 0 or done == n_photos:
            print(f"  {done:>9,} photos  {time.perf_counter() - start:6.1f} s", file=sys.stderr, flush=True)
    return time.perf_counter() - start


def queries(index: Index, kind: str, n: int, rng) -> list[str]:
    rows = index.db.execute("SELECT name, photo_count FROM tags WHERE photo_count > 0").fetchall()
    names = [r[0] for r in rows]
    p = np.array([r[1] for r in rows], dtype=float)
    p /= p.sum()
    size = {"1-tag": 1, "3-tag AND": 3, "OR": 2, "NOT": 2}[kind]
    out = []
    for _ in range(n):
        a, *rest = (f'"{names[i]}"' for i in rng.choice(len(names), size=size, replace=False, p=p))
        if kind == "OR":
            out.append(f"{a} OR {rest[0]}")
        elif kind == "NOT":
            out.append(f"{a} -{rest[0]}")
        else:
            out.append(" ".join([a, *rest]))
    return out


def timed(index: Index, qs: list[str], limit: int | None) -> list[float]:
    """Milliseconds per query; `limit=None` is the exhaustive baseline: every hit scored and
    sorted, then the tags of the best 50 fetched (as the limited search does for its hits)."""
    times = []
    for q in qs:
        t = time.perf_counter()
        if limit is None:
            hits = search(index, q, limit=None, with_tags=False)
            hits.sort(key=lambda h: -(h.score or 0))
            photo_tags_by_id(index, [h.id for h in hits[:50]])
        else:
            search(index, q, limit=limit)
        times.append((time.perf_counter() - t) * 1000)
    return times


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--photos", type=int, default=1_000_000)
    ap.add_argument("--tags-per-photo", type=int, default=12)
    ap.add_argument("--vocab", type=int, default=4585)
    ap.add_argument("--batch", type=int, default=5000)
    ap.add_argument("--queries", type=int, default=100, help="queries per type")
    ap.add_argument("--baseline-queries", type=int, default=5, help="queries per type for the exhaustive baseline")
    ap.add_argument("--db", type=Path, help="index file (default: a temporary one, deleted afterwards); "
                    "one that already holds --photos photos is reused without building")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    rng = np.random.default_rng(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        db_path = args.db or Path(tmp) / "index.db"
        print(f"load average (1, 5, 15 min) at start: {load_average()}")
        with Index.open(db_path) as index:
            have = index.db.execute("SELECT count(*) FROM photos").fetchone()[0]
            if have and have != args.photos:
                sys.exit(f"{db_path} holds {have:,} photos, not {args.photos:,}: pick another --db")
            if have:
                print(f"\nbuild: skipped, reusing {db_path}")
            else:
                print(f"building {args.photos:,} photos x {args.tags_per_photo} tags in batches of {args.batch:,}", file=sys.stderr)
                seconds = build(index, args.photos, vocabulary(args.vocab), args.tags_per_photo, args.batch, rng)
                index.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                print(f"\nbuild: {args.photos:,} photos in {seconds:.1f} s ({args.photos / seconds:,.0f} photos/s)")
            n_tags = index.db.execute("SELECT count(*) FROM photo_tags").fetchone()[0]
            print(f"index: {n_tags:,} photo tags; file {db_path.stat().st_size / 2**20:,.0f} MiB")
        # Queries run as `ramcli search` runs them: on a read-only connection.
        query_rng = np.random.default_rng(args.seed + 1)  # the same queries whether built or reused
        with Index.open(db_path, readonly=True) as index:
            print(f"\n{'query type':<11} {'p50 ms':>8} {'p95 ms':>8}   {'baseline p50':>12} {'baseline p95':>12}   (limit 50)")
            for kind in ("1-tag", "3-tag AND", "OR", "NOT"):
                qs = queries(index, kind, args.queries, query_rng)
                fast = timed(index, qs, 50)
                slow = timed(index, qs[: args.baseline_queries], None)
                print(f"{kind:<11} {pct(fast, 50):8.1f} {pct(fast, 95):8.1f}   {pct(slow, 50):12.1f} {pct(slow, 95):12.1f}")
            print("\nbaseline: the same queries with every hit scored and sorted (no early stop).")
        print(f"load average (1, 5, 15 min) at end: {load_average()}")


if __name__ == "__main__":
    main()
