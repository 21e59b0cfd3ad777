"""One `ramcli tag` run: discovery, the incremental filter, the model, the sinks, progress, summary.

Order matters for resumability: each batch is recorded in the index in one transaction after
its results were printed and written into the files, so a run killed at any moment resumes with
the photos of the batch in flight and nothing else.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from ramcli.discover import Found, describe_skipped, discover
from ramcli.embed_cache import EmbeddingCache
from ramcli.errors import UsageError
from ramcli.metadata import WriterOptions
from ramcli.precision import DEFAULT_CHECK_PHOTOS
from ramcli.records import PhotoResult


@dataclass
class Summary:
    tagged: int = 0
    unchanged: int = 0
    moved: int = 0
    rescored: int = 0  # of the tagged: from cached embeddings, decoder only
    failed: list[tuple[str, str]] = field(default_factory=list)
    written: int = 0
    write_failed: list[tuple[str, str]] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)
    precision: str = ""  # the arithmetic used, and why (auto's decision)


class MetadataSink:
    """Writes each batch's tags into the photos' metadata before the index records the batch.

    The results are updated with the files' size and mtime after the write, so the index keeps
    the post-write state and the next run does not take ramcli's own write for a change.
    """

    def __init__(self, writer, model_id: str, summary: Summary):
        self.writer, self.model_id, self.summary = writer, model_id, summary

    def __call__(self, results: list[PhotoResult]) -> None:
        tagged = [r for r in results if r.status == "tagged"]
        if not tagged:
            return
        outcomes = self.writer.write_batch([(r.path, r.tags) for r in tagged], model_id=self.model_id,
                                           captions=[r.caption for r in tagged])
        for result, outcome in zip(tagged, outcomes):
            if outcome.status == "written":
                self.summary.written += 1
                if outcome.size is not None:
                    result.size, result.mtime_ns = outcome.size, outcome.mtime_ns
            elif outcome.status == "failed":
                self.summary.write_failed.append((result.path, outcome.error or "write failed"))

    def close(self) -> None:
        self.writer.close()


@dataclass
class TagRun:
    paths: list[Path]
    weights: str | None = None
    arch: str | None = None
    labels: Path | None = None
    device: str = "auto"
    precision: str = "auto"
    precision_check: int = DEFAULT_CHECK_PHOTOS  # photos auto scores both ways before picking a CPU fast path
    decode: str = "auto"  # where JPEGs are decoded: workers (Pillow) or the model's device
    batch_size: int | None = None
    workers: int | None = None
    compile_model: bool | None = None  # None: compile when the job is large enough to repay it
    threshold: float | None = None
    threshold_file: Path | None = None
    top_k: int | None = None
    lang: str = "en"
    exclude_tags: list[str] = field(default_factory=list)
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    fmt: str = "jsonl"
    output: Path | None = None
    dry_run: bool = False
    force: bool = False
    use_index: bool = True
    index_path: Path | None = None
    write: bool = True
    writer_options: WriterOptions | None = None
    cache_embeddings: bool = False
    caption: bool = False
    quiet: bool = False

    # ------------------------------------------------------------------ steps
    def _discover(self) -> tuple[list[Found], Counter]:
        for p in self.paths:
            if not p.exists() and not p.is_symlink():
                raise UsageError(f"no such file or folder: {p}")
        found = list(discover(self.paths, self.include, self.exclude))
        counts = Counter(f.kind for f in found)
        photos = [f for f in found if f.kind in ("image", "raw")]
        return photos, counts

    def _shard(self, photos: list[Found]) -> list[Found]:
        """Under torchrun, each rank takes every WORLD_SIZE-th photo."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        return photos[rank::world] if world > 1 else photos

    def execute(self, console: Console, err_console: Console) -> int:
        """Run; returns the number of photos that failed."""
        from ramcli.models import load_model, model_id_of
        from ramcli.output import ResultWriter
        from ramcli.pipeline import (
            Tagger, default_batch_size, default_workers, read_threshold_file, resolve_device,
            resolve_decode, resolve_precision, tag_files,
        )
        from ramcli.vocab import Vocabulary

        if self.write and not self.use_index:
            raise UsageError("--no-index needs --no-write: the index keeps the ledger that makes `untag` exact")
        start = time.monotonic()
        summary = Summary()
        photos, counts = self._discover()
        photos = self._shard(photos)
        summary.skipped = Counter({k: v for k, v in counts.items() if k not in ("image", "raw")})
        device = resolve_device(self.device)
        precision = resolve_precision(device, self.precision)
        decode = resolve_decode(device, self.decode)
        vocab = Vocabulary.open()
        model_id = model_id_of(self.weights)

        index = None
        if self.use_index:
            from ramcli.index import Index

            index = Index.open(self.index_path)
        try:
            todo = photos
            if index is not None and not self.force:
                todo = [f for f in photos if index.needs_tagging(str(f.path), f.size, f.mtime_ns, model_id, vocab.version)]
            summary.unchanged = len(photos) - len(todo)
            if self.dry_run:
                for f in todo:
                    console.print(str(f.path), markup=False, highlight=False, soft_wrap=True)
                if not self.quiet:
                    err_console.print(f"would tag {len(todo)} photo(s); {summary.unchanged} unchanged; "
                                      f"{describe_skipped(summary.skipped) or 'nothing skipped'}")
                return 0
            if not todo:
                self._print_summary(err_console, summary, start)
                return 0

            model = load_model(self.weights, arch=self.arch, labels_dir=self.labels, device=device,
                               on_pull=lambda p: err_console.print(
                                   f"downloading {p.name} ({p.size / 1e9:.1f} GB) from huggingface.co/{p.repo_id} …"))
            applied = vocab.apply_to_model(model)
            thresholds = read_threshold_file(self.threshold_file, len(model.labels)) if self.threshold_file else None
            cache = EmbeddingCache(model.model_id) if self.cache_embeddings else None
            captioner = self._load_captioner(model) if self.caption else None
            tagger = Tagger(model, device, precision, threshold=self.threshold, thresholds=thresholds,
                            exclude=self.exclude_tags, top_k=self.top_k, cache=cache,
                            compile=self._should_compile(device, len(todo)),
                            captioner=captioner, **self._precision_check(precision, len(todo), summary, err_console))
            if precision != "auto":
                summary.precision = precision
            cached, todo = self._split_cached(todo, index, model.model_id, cache)
            summary.rescored = len(cached)
            writer = self._metadata_sink(index, summary, model.model_id) if self.write else None
            sinks = [ResultWriter(self.fmt, self.output, self.lang)]
            if writer is not None:
                sinks.append(writer)
            if index is not None:
                names, names_zh, n = model.labels.names, model.labels.names_zh, model.arch.num_classes
                index.upsert_tags(names[:n], names_zh[:n], "builtin")
                index.upsert_tags(names[n:], names_zh[n:], "custom")  # the vocabulary's, appended
                sinks.append(index.record_batch)
            sinks.append(lambda results: self._count(results, summary))

            skip = self._moved_skipper(index, summary) if index is not None else None
            batch_size = self.batch_size or default_batch_size(device)
            workers = default_workers() if self.workers is None else self.workers
            show = not self.quiet and err_console.is_terminal
            with Progress(TextColumn("[bold]tagging"), BarColumn(), MofNCompleteColumn(),
                          TextColumn("{task.fields[rate]:.1f} img/s"), TextColumn("{task.fields[failed]} failed"),
                          TimeRemainingColumn(), console=err_console, disable=not show) as progress:
                task = progress.add_task("tag", total=len(todo) + len(cached), rate=0.0, failed=0)

                def advance(n: int, failed: int) -> None:
                    elapsed = max(time.monotonic() - start, 1e-6)
                    progress.update(task, advance=n, failed=len(summary.failed),
                                    rate=(summary.tagged + len(summary.failed)) / elapsed)

                try:
                    self._rescore_cached(cached, tagger, sinks, applied.version, advance)
                    tag_files([f.path for f in todo], tagger, sinks, batch_size, workers,
                              vocab_version=applied.version, on_batch=advance, skip=skip, decode=decode)
                    if tagger.checking:
                        summary.precision = "fp32 (auto: too few photos decoded to finish the fast-path check)"
                finally:
                    sinks[0].close()
                    if writer is not None:
                        writer.close()
        finally:
            if index is not None:
                index.close()
        if not self.quiet:
            self._print_summary(err_console, summary, start)
        return len(summary.failed)

    #: Photos from which torch.compile pays off. Measured on the 2-core CPU: compiling RAM Swin-L
    #: takes ~2 min and halves each batch's time (~2.7 s saved per photo); on a GPU it saves about
    #: 2 ms per photo (timm's Swin-L figures), so only very large jobs repay the compile time there.
    COMPILE_FROM = {"cpu": 100, "cuda": 50_000}

    def _should_compile(self, device, photos: int) -> bool:
        if self.compile_model is not None:
            return self.compile_model
        return photos >= self.COMPILE_FROM.get(device.type, 10**9)

    def _precision_check(self, precision: str, photos: int, summary: Summary, err_console: Console) -> dict:
        """Tagger arguments of the CPU's auto check: how many photos, the cache key of this model
        file on this CPU, and where the decision is reported (now, and in the summary)."""
        if precision != "auto":
            return {}
        from ramcli.models import resolve_weights
        from ramcli.precision import DecisionCache

        def report(decision) -> None:
            summary.precision = f"{decision.precision} (auto: {decision.reason})"
            if not self.quiet:
                err_console.print(decision.describe(), markup=False, highlight=False)

        enough = photos >= self.precision_check
        return {"check_photos": self.precision_check if enough else 0, "on_decision": report,
                "cache_key": DecisionCache.key(resolve_weights(self.weights)[0])}

    @staticmethod
    def _rescore_cached(cached: list, tagger, sinks, vocab_version: str, advance, chunk: int = 256) -> None:
        """Photos whose embeddings are cached: decoder-only scores, then the same sinks."""
        for first in range(0, len(cached), chunk):
            part = cached[first:first + chunk]
            scores = tagger.rescore_cached([rec.content_hash for _, rec in part])
            results = [
                PhotoResult(path=rec.path, status="tagged", size=f.size, mtime_ns=f.mtime_ns,
                            content_hash=rec.content_hash, model_id=tagger.model.model_id,
                            vocab_version=vocab_version, tags=tags)
                for (f, rec), tags in zip(part, tagger.decide(scores))
            ]
            for sink in sinks:
                sink(results)
            advance(len(part), 0)

    def _load_captioner(self, model):
        """Tag2Text's caption generator, from the training parts of the original .pth."""
        from ramcli.models import get_published, resolve_weights
        from ramcli.models.checkpoint import is_converted, read_official
        from ramcli.models.registry import download

        if model.arch.family != "tag2text":
            raise UsageError("--caption needs Tag2Text weights (tag2text_swin_14m): RAM and RAM++ do not caption")
        path, name = resolve_weights(self.weights)
        if is_converted(path):
            if name is None:
                raise UsageError("--caption needs the original Tag2Text .pth: converted files are tag-only")
            path = download(get_published(name))  # the hub cache keeps the original after `pull`
        try:
            from ramcli_train.caption import load_official_generator
        except ImportError as exc:
            raise UsageError(f"--caption needs the training extras: pip install 'ramcli[train]' ({exc.name})") from None
        return load_official_generator(read_official(path))

    @staticmethod
    def _split_cached(todo: list[Found], index, model_id: str, cache) -> tuple[list, list[Found]]:
        """Photos due only because the vocabulary changed, whose embeddings are cached, need only
        the recognition decoder: (those with their index records, the rest)."""
        if cache is None or index is None:
            return [], todo
        cached, rest = [], []
        for f in todo:
            rec = index.lookup(str(f.path))
            if (rec is not None and rec.status == "tagged" and rec.size == f.size and rec.mtime_ns == f.mtime_ns
                    and rec.model_id == model_id and rec.content_hash and rec.content_hash in cache):
                cached.append((f, rec))
            else:
                rest.append(f)
        return cached, rest

    # ------------------------------------------------------------------ sinks
    @staticmethod
    def _count(results: list[PhotoResult], summary: Summary) -> None:
        for r in results:
            if r.status == "tagged":
                summary.tagged += 1
            else:
                summary.failed.append((r.path, r.error or r.status))

    def _moved_skipper(self, index, summary: Summary):
        """A photo whose image data the index knows under a path that is gone was moved: re-point it."""

        def skip(item) -> bool:
            if index.lookup(str(item.path)) is not None:
                return False
            old = index.find_moved(item.content_hash)
            if old is None:
                return False
            index.move(old.path, str(item.path), item.size, item.mtime_ns)
            summary.moved += 1
            return True

        return skip

    def _metadata_sink(self, index, summary: Summary, model_id: str) -> MetadataSink:
        from ramcli.ledger import Ledger
        from ramcli.metadata import MetadataWriter

        options = self.writer_options or WriterOptions(lang=self.lang)
        return MetadataSink(MetadataWriter(options, Ledger(index.db)), model_id, summary)

    # ------------------------------------------------------------------ report
    def _print_summary(self, err: Console, s: Summary, start: float) -> None:
        elapsed = time.monotonic() - start
        parts = [f"tagged {s.tagged}" + (f" ({s.rescored} from cached embeddings)" if s.rescored else ""),
                 f"unchanged {s.unchanged}"]
        if s.moved:
            parts.append(f"moved {s.moved}")
        if self.write:
            parts.append(f"metadata written {s.written}")
        skipped = describe_skipped(s.skipped)
        if skipped:
            parts.append(skipped)
        parts.append(f"failed {len(s.failed)}")
        rate = s.tagged / elapsed if elapsed > 0 else 0.0
        err.print(", ".join(parts) + f" in {elapsed:.1f} s ({rate:.2f} img/s)", highlight=False)
        if s.precision:
            err.print(f"precision: {s.precision}", markup=False, highlight=False)
        for path, reason in s.failed:
            err.print(f"  failed: {path}: {reason}", markup=False, highlight=False, soft_wrap=True)
        for path, reason in s.write_failed:
            err.print(f"  not written: {path}: {reason}", markup=False, highlight=False, soft_wrap=True)
