"""One `ramcli tag` run: discovery, the incremental filter, the model, the sinks, progress, summary.

Order matters for resumability: each batch is recorded in the index in one transaction after
its results were printed and written into the files, so a run killed at any moment resumes with
the photos of the batch in flight and nothing else.

The run's promise is "every photo tagged, indexed and written": a broken photo, a file with a
photo's name that is none, or a metadata write that failed breaks it, is listed by path with
its reason and makes `execute` return non-zero. What is left alone by policy (a symlink leading
out of the tagged folders, see docs/formats.md) is listed too, but is no failure.
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
from ramcli.pathnames import display
from ramcli.precision import DEFAULT_CHECK_PHOTOS
from ramcli.records import PhotoResult

#: Why a photo reached through a symlink that leaves the tagged folders keeps its metadata.
OUTSIDE_LINK = "symlink to a file outside the tagged folders: indexed, metadata not written (--follow-links writes it)"


@dataclass
class Summary:
    tagged: int = 0
    unchanged: int = 0
    moved: int = 0
    rescored: int = 0  # of the tagged: from cached embeddings, decoder only
    failed: list[tuple[str, str]] = field(default_factory=list)
    written: int = 0
    write_failed: list[tuple[str, str]] = field(default_factory=list)
    not_written: list[tuple[str, str]] = field(default_factory=list)  # left alone by policy
    not_followed: list[tuple[str, str]] = field(default_factory=list)  # folder links not walked
    skipped: Counter = field(default_factory=Counter)
    precision: str = ""  # the arithmetic used, and why (auto's decision)

    @property
    def problems(self) -> int:
        """Photos whose promise was not kept: not tagged, or tagged but not written."""
        return len(self.failed) + len(self.write_failed)


class MetadataSink:
    """Writes each batch's tags into the photos' metadata before the index records the batch.

    The results are updated with the files' size and mtime after the write, so the index keeps
    the post-write state and the next run does not take ramcli's own write for a change.
    `left_alone`: result paths not to write, with the reason (symlinks out of the tagged folders).
    """

    def __init__(self, writer, model_id: str, summary: Summary, left_alone: dict[str, str] | None = None):
        self.writer, self.model_id, self.summary = writer, model_id, summary
        self.left_alone = left_alone or {}

    def __call__(self, results: list[PhotoResult]) -> None:
        tagged = []
        for r in results:
            if r.status == "tagged" and r.path in self.left_alone:
                self.summary.not_written.append((r.path, self.left_alone[r.path]))
            elif r.status == "tagged":
                tagged.append(r)
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
    follow_links: bool = False  # walk and write through symlinks that leave the tagged folders
    #: What discovery reported besides photos (errors, folder links not walked), set by `_discover`.
    reported: list[Found] = field(default_factory=list, init=False, repr=False)

    # ------------------------------------------------------------------ steps
    def _discover(self) -> tuple[list[Found], Counter]:
        for p in self.paths:
            if not p.exists() and not p.is_symlink():
                raise UsageError(f"no such file or folder: {p}")
        found = list(discover(self.paths, self.include, self.exclude, follow_links=self.follow_links))
        counts = Counter(f.kind for f in found)
        photos = [f for f in found if f.kind in ("image", "raw")]
        self.reported = [f for f in found if f.kind in ("error", "link")]
        return photos, counts

    def _shard(self, photos: list[Found]) -> list[Found]:
        """Under torchrun, each rank takes every WORLD_SIZE-th photo (and reports every
        WORLD_SIZE-th problem, so each is listed once)."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        return photos[rank::world] if world > 1 else photos

    def execute(self, console: Console, err_console: Console) -> int:
        """Run; returns the number of photos that failed: not tagged (broken, not a photo) or
        whose metadata write failed."""
        from ramcli.decision import read_threshold_file
        from ramcli.models import load_model, model_id_of
        from ramcli.output import result_writer
        from ramcli.pipeline import (
            Tagger, default_batch_size, default_workers, resolve_device,
            resolve_decode, resolve_precision, tag_files,
        )
        from ramcli.vocab import Vocabulary

        if self.write and not self.use_index:
            raise UsageError("--no-index needs --no-write: the index keeps the ledger that makes `untag` exact")
        start = time.monotonic()
        summary = Summary()
        photos, counts = self._discover()
        photos = self._shard(photos)
        summary.skipped = Counter({k: v for k, v in counts.items() if k not in ("image", "raw", "error")})
        for f in self._shard(self.reported):  # a broken photo (or unreadable folder) fails like an undecodable one
            (summary.failed if f.kind == "error" else summary.not_followed).append((str(f.path), f.reason or f.kind))
        links = {str(f.path): str(f.link) for f in photos if f.link is not None}
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
                    console.print(display(f.path), markup=False, highlight=False, soft_wrap=True)
                if not self.quiet:
                    broken = f"; {len(summary.failed)} broken" if summary.failed else ""
                    err_console.print(f"would tag {len(todo)} photo(s); {summary.unchanged} unchanged; "
                                      f"{describe_skipped(summary.skipped) or 'nothing skipped'}{broken}")
                    for path, reason in summary.failed:
                        err_console.print(f"  broken: {display(path)}: {reason}", markup=False, highlight=False,
                                          soft_wrap=True)
                return 0
            if not todo:
                if not self.quiet:
                    self._print_summary(err_console, summary, start)
                return summary.problems

            model = load_model(self.weights, arch=self.arch, labels_dir=self.labels, device=device,
                               on_pull=lambda p: err_console.print(
                                   f"downloading {p.name} ({p.size / 1e9:.1f} GB) from huggingface.co/{p.repo_id} …"))
            applied = vocab.apply_to_model(model)
            if applied.skipped_custom:
                err_console.print(f"warning: {model.arch.family} has a closed vocabulary and cannot score custom tags; "
                                  f"not emitted: {', '.join(applied.skipped_custom)}",
                                  markup=False, highlight=False, soft_wrap=True)
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
            writer = self._metadata_sink(index, summary, model.model_id, links) if self.write else None
            sinks = [result_writer(self.fmt, self.output, self.lang)]
            if writer is not None:
                sinks.append(writer)
            if index is not None:
                names, names_zh, n = model.labels.names, model.labels.names_zh, model.arch.num_classes
                index.upsert_tags(names[:n], names_zh[:n], "builtin")
                index.upsert_tags(names[n:], names_zh[n:], "custom")  # the vocabulary's, appended
                sinks.append(lambda results: index.record_batch(results, links=links))
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
        return summary.problems

    #: Photos from which torch.compile pays off: compiling costs a fixed time and saves a part of
    #: every batch. On the CPU, where a photo takes seconds, a hundred photos repay it; on a GPU,
    #: where it saves milliseconds per photo, only very large jobs do (docs/performance.md).
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
        from ramcli.caption import load_official_generator

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
        """A photo whose image data the index knows under a path that is gone was moved: re-point it.

        Only the very file moves with its size and mtime (a rename keeps both), so only then does
        the write ledger follow it and the photo skip the model. Any other file with that image
        data (a copy restored from before ramcli wrote, an edited copy) takes the record over but
        not the ledger, and is tagged and written like a new photo: the ledger's rows describe
        the old file, and against the copy they would say the user deleted ramcli's tags."""

        def skip(item) -> bool:
            if index.lookup(str(item.path)) is not None:
                return False
            old = index.find_moved(item.content_hash)
            if old is None:
                return False
            same_file = (old.size, old.mtime_ns) == (item.size, item.mtime_ns)
            index.move(old.path, str(item.path), item.size, item.mtime_ns, with_ledger=same_file)
            if same_file:
                summary.moved += 1
            return same_file

        return skip

    def _metadata_sink(self, index, summary: Summary, model_id: str, links: dict[str, str]) -> MetadataSink:
        from ramcli.ledger import Ledger
        from ramcli.metadata import MetadataWriter

        options = self.writer_options or WriterOptions(lang=self.lang)
        left_alone = {} if self.follow_links else dict.fromkeys(links, OUTSIDE_LINK)
        return MetadataSink(MetadataWriter(options, Ledger(index.db)), model_id, summary, left_alone)

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
        if s.write_failed:
            parts.append(f"metadata write failed {len(s.write_failed)}")
        rate = s.tagged / elapsed if elapsed > 0 else 0.0
        err.print(", ".join(parts) + f" in {elapsed:.1f} s ({rate:.2f} img/s)", highlight=False)
        if s.precision:
            err.print(f"precision: {s.precision}", markup=False, highlight=False)
        for label, rows in (("failed", s.failed), ("not written", s.write_failed + s.not_written),
                            ("not followed", s.not_followed)):
            for path, reason in rows:
                err.print(f"  {label}: {display(path)}: {reason}", markup=False, highlight=False, soft_wrap=True)
