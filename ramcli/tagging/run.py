"""One `ramcli tag` run: discovery, the incremental filter, the model, the sinks, progress, summary.

Order matters for resumability: each batch is recorded in the index in one transaction after
its results were written into the files and printed, so a run killed at any moment resumes with
the photos of the batch in flight and nothing else. Before any of that, each photo's file is
checked to still be the one that was decoded, and each failure is judged (`Triage`).

A `TagSession` holds what outlives one run (the index, the loaded model, ExifTool, the output):
`ramcli tag` runs once in it, `ramcli watch` once per group of photos that arrive.

The run's promise is "every photo tagged, indexed and written": a broken photo, a file with a
photo's name that is none, or a metadata write that failed breaks it, gets a line in the output
and the index, and is listed by path with its reason. Only a failure the index did not know
before makes `execute` return non-zero, so a run that only meets old failures succeeds; a
broken photo (one that cannot be decoded until its file changes) is not even tried again until
its file changes or `--retry-broken`, and a photo whose metadata write failed is written again
by the next run. What is left alone by policy (a symlink leading out of the tagged folders, see
docs/formats.md) is listed too, but is no failure.
"""

from __future__ import annotations

import os
import stat
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from ramcli.media.discover import Found, describe_skipped, discover
from ramcli.tagging.embed_cache import EmbeddingCache
from ramcli.errors import UsageError
from ramcli.metadata import WriterOptions
from ramcli.pathnames import display, is_uri
from ramcli.tagging.precision import DEFAULT_CHECK_PHOTOS
from ramcli.tagging.records import PhotoResult
from ramcli.library.writeback import unwritten

#: Why a photo reached through a symlink that leaves the tagged folders keeps its metadata.
OUTSIDE_LINK = "symlink to a file outside the tagged folders: indexed, metadata not written (--follow-links writes it)"


@dataclass
class Summary:
    tagged: int = 0
    unchanged: int = 0
    moved: int = 0
    removed: int = 0  # photos whose files were deleted, dropped from the index (`ramcli watch`)
    rescored: int = 0  # of the tagged: from cached embeddings, decoder only
    failed: list[tuple[str, str]] = field(default_factory=list)  # new failures: not tagged
    known_failed: list[tuple[str, str]] = field(default_factory=list)  # failed again as the index says they did
    broken_skipped: int = 0  # broken photos not tried: unchanged since they failed
    written: int = 0
    write_failed: list[tuple[str, str]] = field(default_factory=list)  # new write failures
    still_unwritten: list[tuple[str, str]] = field(default_factory=list)  # retried, failed as before
    not_written: list[tuple[str, str]] = field(default_factory=list)  # left alone by policy
    not_followed: list[tuple[str, str]] = field(default_factory=list)  # folder links not walked
    skipped: Counter = field(default_factory=Counter)
    precision: str = ""  # the arithmetic used, and why (auto's decision)

    @property
    def problems(self) -> int:
        """New failures: photos not tagged, or tagged but not written, that the index did not
        already hold as failed in the same way (the exit code follows them)."""
        return len(self.failed) + len(self.write_failed)


#: Why a photo that changed between its decode and its write is neither written nor recorded.
CHANGED = "the file changed while it was being tagged: not written; tagged again next run"


class Triage:
    """The first sink: it checks each tagged photo's file and judges each failure, before
    anything is written, printed or recorded.

    A tagged photo whose file is no longer the one decoded (size, mtime or inode differ:
    replaced, edited, deleted) becomes a failure, so the old image's tags never land in the new
    one and the index never calls it up to date. A failure is 'broken' when it lasts until the
    file changes: the file reads, is the very file discovery found, and is no photo ramcli can
    decode (empty, not an image, truncated, a decoder's error); it is recorded with its size and
    mtime and not tried again until they change. Any other failure (unreadable, vanished, changed
    meanwhile) stays 'failed' and is retried next run. A failure is *known* when the index holds
    it already, with the same status and error; only new ones count as the run's problems.

    `photos`: what discovery found, taken (with each inode) before anything is decoded."""

    def __init__(self, photos: list[Found], index, summary: Summary):
        self.before = {str(f.path): _identity(f.path, f.size, f.mtime_ns) for f in photos}
        self.index, self.summary = index, summary

    def __call__(self, results: list[PhotoResult]) -> None:
        for r in results:
            if r.status == "tagged":
                if not self._changed(r):
                    continue
                r.status, r.error, r.tags, r.caption = "failed", CHANGED, [], None
            self.listed(r, self.judge(r))

    def judge(self, r: PhotoResult) -> bool:
        """Make a failure 'broken' or leave it 'failed'; whether the index knows it already."""
        before = self.before.get(r.path)
        if before is not None and _lasting(r.path, before):
            r.status, (r.size, r.mtime_ns) = "broken", before[:2]
        record = self.index.lookup(r.path) if self.index is not None else None
        return (record is not None and (record.status, record.error) == (r.status, r.error)
                and (r.status != "broken" or (record.size, record.mtime_ns) == (r.size, r.mtime_ns)))

    def listed(self, r: PhotoResult, known: bool) -> None:
        (self.summary.known_failed if known else self.summary.failed).append((r.path, r.error or r.status))

    def _changed(self, r: PhotoResult) -> bool:
        if is_uri(r.path):  # object storage (`--ray`): no local file to compare; never written
            return False
        before = self.before.get(r.path)
        now = _identity(r.path)
        return now is None or before is None or (now[0], now[1], now[2]) != (r.size, r.mtime_ns, before[2])


def _identity(path: str | os.PathLike, size: int | None = None, mtime_ns: int | None = None) -> tuple | None:
    """(size, mtime_ns, (device, inode)) of a file now; given size and mtime replace the stat's."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_size if size is None else size, st.st_mtime_ns if mtime_ns is None else mtime_ns,
            (st.st_dev, st.st_ino))


def _lasting(path: str, before: tuple) -> bool:
    """Whether a failure lasts until the file changes: the file is a regular file, still the one
    discovery found (`before`, from `_identity`), and readable."""
    now = _identity(path)
    if now is None or now != before or not stat.S_ISREG(os.stat(path).st_mode):
        return False
    try:
        with open(path, "rb") as fh:
            fh.read(1)
    except OSError:
        return False
    return True


class MetadataSink:
    """Writes each batch's tags into the photos' metadata before the index records the batch.

    The results are updated with the files' size and mtime after the write, so the index keeps
    the post-write state and the next run does not take ramcli's own write for a change. A
    result whose write failed keeps the reason as its `error` (the output shows it; the index
    keeps it, so the next run writes the photo again).
    `left_alone`: result paths not to write, with the reason (symlinks out of the tagged folders).
    """

    def __init__(self, writer, model_id: str, summary: Summary, index=None,
                 left_alone: dict[str, str] | None = None):
        self.writer, self.model_id, self.summary, self.index = writer, model_id, summary, index
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
                result.error = unwritten(outcome.error)
                record = self.index.lookup(result.path) if self.index is not None else None
                known = record is not None and (record.status, record.error) == ("tagged", result.error)
                (self.summary.still_unwritten if known else self.summary.write_failed).append(
                    (result.path, outcome.error or "write failed"))

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
    runtime: str = "auto"  # "openvino": the tagging graph on OpenVINO (converted once, cached)
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
    retry_broken: bool = False  # try broken photos again although their files did not change
    use_index: bool = True
    index_path: Path | None = None
    write: bool = True
    writer_options: WriterOptions | None = None
    cache_embeddings: bool = False
    caption: bool = False
    quiet: bool = False
    #: Asked after each batch; True ends the run there, the batch in flight written and recorded
    #: (`ramcli watch` stops this way on Ctrl-C or SIGTERM).
    stop: Callable[[], bool] | None = None
    follow_links: bool = False  # walk and write through symlinks that leave the tagged folders
    #: Runs the model over the due photos, with `ramcli.tagging.pipeline.tag_files`'s signature; None is
    #: the local pipeline (`ramcli.tagging.on_ray` passes a Ray Data one, recorded by the same sinks).
    runner: Callable | None = None
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

    def open_session(self, err_console: Console) -> TagSession:
        """The index, model and sinks for one or more runs with these options (a context manager)."""
        return TagSession(self, err_console)

    def execute(self, console: Console, err_console: Console, session: TagSession | None = None) -> int:
        """Run; returns the number of new failures: photos not tagged (broken, not a photo) or
        whose metadata write failed, that the index did not already hold as failed in the same
        way. `session`: an open one to use and leave open (`ramcli watch` keeps the model loaded
        between runs); by default the run has its own."""
        if session is None:
            with self.open_session(err_console) as own:
                return self.execute(console, err_console, own)
        start = time.monotonic()
        photos, counts = self._discover()
        photos = self._shard(photos)
        summary = Summary(skipped=Counter({k: v for k, v in counts.items() if k not in ("image", "raw", "error")}))
        reported = self._shard(self.reported)
        errors = [f for f in reported if f.kind == "error"]
        summary.not_followed = [(str(f.path), f.reason or f.kind) for f in reported if f.kind != "error"]
        if self.dry_run:
            todo = session.due(photos, summary)
            summary.unchanged = len(photos) - len(todo) - summary.broken_skipped
            for f in todo:
                console.print(display(f.path), markup=False, highlight=False, soft_wrap=True)
            if not self.quiet:
                broken = f"; {len(errors)} broken" if errors else ""
                err_console.print(f"would tag {len(todo)} photo(s); {summary.unchanged} unchanged; "
                                  f"{describe_skipped(summary.skipped) or 'nothing skipped'}{broken}")
                for f in errors:
                    err_console.print(f"  broken: {display(f.path)}: {f.reason}", markup=False, highlight=False,
                                      soft_wrap=True)
            return 0
        session.run_pass(photos, errors, summary, start)
        if not self.quiet:
            self.print_summary(err_console, summary, start)
        return summary.problems

    #: Photos from which torch.compile pays off: compiling costs a fixed time and saves a part of
    #: every batch. On the CPU, where a photo takes seconds, a hundred photos repay it; on a GPU,
    #: where it saves milliseconds per photo, only very large jobs do (docs/performance.md).
    COMPILE_FROM = {"cpu": 100, "cuda": 50_000}

    def _should_compile(self, device, photos: int) -> bool:
        if self.compile_model is not None:
            return self.compile_model
        return photos >= self.COMPILE_FROM.get(device.type, 10**9)

    @staticmethod
    def _rescore_cached(cached: list, tagger, sinks, vocab_version: str, advance, chunk: int = 256) -> None:
        """Photos whose embeddings are cached: decoder-only scores, then the same sinks."""
        for first in range(0, len(cached), chunk):
            part = cached[first:first + chunk]
            scores = tagger.rescore_cached([rec.content_hash for _, rec in part])
            results = [
                PhotoResult(path=str(f.path), status="tagged", size=f.size, mtime_ns=f.mtime_ns,
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
        from ramcli.models.caption import load_official_generator

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
        summary.tagged += sum(r.status == "tagged" for r in results)  # failures: `Triage`

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

    def _metadata_sink(self, index, model_id: str) -> MetadataSink:
        """A sink with its own ExifTool writer; each `TagSession.tag` sets its summary and the
        paths it leaves alone."""
        from ramcli.library.ledger import Ledger
        from ramcli.metadata import MetadataWriter

        options = self.writer_options or WriterOptions(lang=self.lang)
        return MetadataSink(MetadataWriter(options, Ledger(index.db)), model_id, Summary(), index)

    # ------------------------------------------------------------------ report
    def print_summary(self, err: Console, s: Summary, start: float) -> None:
        elapsed = time.monotonic() - start
        parts = [f"tagged {s.tagged}" + (f" ({s.rescored} from cached embeddings)" if s.rescored else ""),
                 f"unchanged {s.unchanged}"]
        if s.moved:
            parts.append(f"moved {s.moved}")
        if s.removed:
            parts.append(f"removed {s.removed}")
        if self.write:
            parts.append(f"metadata written {s.written}")
        skipped = describe_skipped(s.skipped)
        if skipped:
            parts.append(skipped)
        parts.append(f"failed {len(s.failed)}")
        if s.known_failed:
            parts.append(f"failed as before {len(s.known_failed)}")
        if s.write_failed:
            parts.append(f"metadata write failed {len(s.write_failed)}")
        if s.still_unwritten:
            parts.append(f"metadata still not written {len(s.still_unwritten)}")
        rate = s.tagged / elapsed if elapsed > 0 else 0.0
        err.print(", ".join(parts) + f" in {elapsed:.1f} s ({rate:.2f} img/s)", highlight=False)
        if s.broken_skipped:
            err.print(f"{s.broken_skipped} broken photo(s) skipped, unchanged since they failed "
                      "(`ramcli stats` lists them; --retry-broken tries them again)", highlight=False)
        if s.precision:
            err.print(f"precision: {s.precision}", markup=False, highlight=False)
        for label, rows in (("failed", s.failed), ("failed as before", s.known_failed),
                            ("not written", s.write_failed + s.still_unwritten + s.not_written),
                            ("not followed", s.not_followed)):
            for path, reason in rows:
                err.print(f"  {label}: {display(path)}: {reason}", markup=False, highlight=False, soft_wrap=True)


#: Jobs of up to this many photos are decoded in-process: starting the decode worker processes
#: takes longer than decoding them (measured with `ramcli watch`, one 12 MP JPEG per job: 4-8 s
#: per job with 2 workers on the busy 2-core machine, 0.25 s in-process).
IN_PROCESS_UP_TO = 8


class _Stopped(Exception):
    """Raised between batches when `TagRun.stop` says so."""


@dataclass
class _Loaded:
    """The model side of a session: loaded on first need, kept until the vocabulary changes."""

    tagger: object  # ramcli.tagging.tagger.Tagger
    vocab_version: str  # of the vocabulary applied to the model


class TagSession:
    """What outlives one run over a list of photos: the index, the model, the ExifTool writer and
    the output stream. `ramcli tag` runs once in a session; `ramcli watch` keeps one open and runs
    once per group of new or changed photos, so the model is loaded once (on first need: a run
    with nothing to tag never loads it).
    """

    def __init__(self, run: TagRun, err_console: Console):
        from ramcli.models import model_id_of
        from ramcli.tagging.pipeline import resolve_decode, resolve_device
        from ramcli.tagging.precision import resolve_precision
        from ramcli.tagging.vocab import Vocabulary

        if run.write and not run.use_index:
            raise UsageError("--no-index needs --no-write: the index keeps the ledger that makes `untag` exact")
        self.run, self.err = run, err_console
        from ramcli.tagging.pipeline import RUNTIMES

        if run.runtime not in RUNTIMES:
            raise UsageError(f"unknown runtime {run.runtime!r}; use one of {', '.join(RUNTIMES)}")
        # OpenVINO's devices (cpu, gpu, npu) are its own; PyTorch then only prepares pixels on the CPU
        self.device = resolve_device("cpu" if run.runtime == "openvino" else run.device)
        self.precision = resolve_precision(self.device, run.precision)
        self.precision_note = self.precision if self.precision != "auto" else ""  # for the summary
        self.decode = resolve_decode(self.device, run.decode)
        self.vocab = Vocabulary.open()
        self.model_id = model_id_of(run.weights)
        self.index = None
        if run.use_index:
            from ramcli.library.index import Index

            self.index = Index.open(run.index_path)
        self._loaded: _Loaded | None = None
        self._output = None
        self._metadata: MetadataSink | None = None

    def __enter__(self) -> TagSession:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def end_output(self) -> None:
        """Finish the results printed so far (a table or JSON array is written at its end)."""
        if self._output is not None:
            output, self._output = self._output, None
            output.close()

    def close(self) -> None:
        try:
            self.end_output()
            if self._metadata is not None:
                self._metadata.close()
        finally:
            if self.index is not None:
                self.index.close()

    def run_pass(self, photos: list[Found], errors: list[Found], summary: Summary, start: float) -> None:
        """One pass over discovered files, the same for `ramcli tag` and each group of arrivals in
        `ramcli watch`: broken files reported, due photos tagged, failed writes retried."""
        self.report_errors(errors, summary)
        todo = self.due(photos, summary)
        summary.unchanged = len(photos) - len(todo) - summary.broken_skipped
        due = {f.path for f in todo}
        self.write_unwritten([f for f in photos if f.path not in due], summary)
        self.tag(todo, summary, start)
        self.end_output()

    def due(self, photos: list[Found], summary: Summary | None = None) -> list[Found]:
        """The incremental rule: photos that are new, changed, tagged by another model or
        vocabulary, or failed in a way that may pass (all of them with --force or without an
        index). A broken photo is due only once its file changed (or with --retry-broken); those
        left out are counted in `summary`. The vocabulary is re-read, so a long session follows
        `ramcli vocab` changes."""
        from ramcli.tagging.vocab import Vocabulary

        vocab = Vocabulary.open()
        if vocab.version != self.vocab.version:
            self.vocab, self._loaded = vocab, None
        if self.index is None or self.run.force:
            return list(photos)
        todo = []
        for f in photos:
            state = self.index.state(str(f.path), f.size, f.mtime_ns, self.model_id, self.vocab.version)
            if state == "due" or (state == "broken" and self.run.retry_broken):
                todo.append(f)
            elif state == "broken" and summary is not None:
                summary.broken_skipped += 1
        return todo

    def metadata_sink(self, model_id: str) -> MetadataSink:
        """The session's one metadata sink (an ExifTool process and a journal), made on first need."""
        if self._metadata is None:
            self._metadata = self.run._metadata_sink(self.index, model_id)
        return self._metadata

    def output(self):
        """The run's result writer, opened on first need."""
        if self._output is None:
            from ramcli.output import result_writer

            self._output = result_writer(self.run.fmt, self.run.output, self.run.lang)
        return self._output

    def report_errors(self, errors: list[Found], summary: Summary) -> None:
        """Files discovery found broken (a photo's name, no photo inside; unreadable): each gets
        a line in the output and a record in the index, like a photo that did not decode. A
        broken one that the index holds as such, unchanged since, is only counted (unless
        --retry-broken or --force). Folders that could not be read are listed, not recorded."""
        folders = [f for f in errors if os.path.isdir(f.path)]
        summary.failed += [(str(f.path), f.reason or "error") for f in folders]
        files = [f for f in errors if not os.path.isdir(f.path)]
        triage = Triage(files, self.index, summary)
        retry = self.run.retry_broken or self.run.force
        results = []
        for f in files:
            r = PhotoResult(path=str(f.path), status="failed", size=f.size or 0, mtime_ns=f.mtime_ns or 0,
                            error=f.reason or "error")
            known = triage.judge(r)
            if known and r.status == "broken" and not retry:
                summary.broken_skipped += 1
            else:
                triage.listed(r, known)
                results.append(r)
        if results:
            self.output()(results)
            if self.index is not None:
                self.index.record_batch(results)

    def write_unwritten(self, unchanged: list[Found], summary: Summary) -> None:
        """Unchanged photos whose tags the index holds but whose files do not, written from the
        index without the model (as `ramcli write`): those whose last metadata write failed (the
        user may have fixed the cause: made a read-only photo writable) and, with
        --follow-links, those reached through a symlink out of the tagged folders that an
        earlier run indexed but left unwritten."""
        run, index = self.run, self.index
        if not (run.write and index is not None and unchanged):
            return
        from ramcli.library.index import normalize_path
        from ramcli.library.writeback import write_indexed

        pending = index.pending_writes()  # path -> why the last write failed; usually none
        paths = [path for f in unchanged if (path := normalize_path(f.path)) in pending] if pending else []
        links = [str(f.path) for f in unchanged if f.link is not None] if run.follow_links else []
        if links:
            written = self.metadata_sink(self.model_id).writer.ledger.entries_of(links)
            paths += [path for path, entries in written.items() if not entries]
        items = [(path, tags) for path in dict.fromkeys(paths) if (tags := index.photo_tags(path))]
        if not items:
            return
        writer = self.metadata_sink(self.model_id).writer
        captions = [index.lookup(path).caption for path, _ in items]
        for (path, _), outcome in zip(items, write_indexed(index, writer, items, captions)):
            if outcome.status == "written":
                summary.written += 1
            elif outcome.status == "failed":
                known = pending.get(normalize_path(path)) == unwritten(outcome.error)
                (summary.still_unwritten if known else summary.write_failed).append(
                    (path, outcome.error or "write failed"))

    def tag(self, todo: list[Found], summary: Summary, start: float) -> None:
        """Tag `todo` batch by batch through every sink (triage, metadata, output, index), with a progress
        bar on a terminal; photos the index knows under a path that is gone are re-pointed. Photos
        reached through a symlink out of the tagged folders are indexed with their link and, unless
        --follow-links, not written."""
        from ramcli.tagging.pipeline import default_batch_size, default_workers, tag_files

        if not todo:
            return
        run, index = self.run, self.index
        links = {str(f.path): str(f.link) for f in todo if f.link is not None}
        triage = Triage(todo, index, summary)  # before anything is decoded
        loaded = self.load(len(todo))
        tagger = loaded.tagger
        cached, todo = run._split_cached(todo, index, tagger.model.model_id, tagger.cache)
        summary.rescored += len(cached)
        sinks = [triage]
        if self._metadata is not None:
            self._metadata.summary = summary
            self._metadata.left_alone = {} if run.follow_links else dict.fromkeys(links, OUTSIDE_LINK)
            sinks.append(self._metadata)
        sinks.append(self.output())  # after the write, so a line shows a write's failure too
        if index is not None:
            sinks.append(lambda results: index.record_batch(results, links=links))
        sinks.append(lambda results: run._count(results, summary))
        skip = run._moved_skipper(index, summary) if index is not None else None
        batch_size = run.batch_size or default_batch_size(self.device)
        workers = run.workers
        if workers is None:
            workers = 0 if len(todo) <= IN_PROCESS_UP_TO else default_workers()
        show = not run.quiet and self.err.is_terminal
        with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TextColumn("{task.fields[rate]:.1f} img/s"), TextColumn("{task.fields[failed]} failed"),
                      TimeRemainingColumn(), console=self.err, disable=not show) as progress:
            def stage() -> str:  # auto's check scores the first photos twice: say so, not a stalled rate
                return "checking precision" if tagger.checking else "tagging"

            task = progress.add_task(stage(), total=len(todo) + len(cached), rate=0.0, failed=0)

            def advance(n: int, failed: int) -> None:
                elapsed = max(time.monotonic() - start, 1e-6)
                progress.update(task, advance=n, failed=len(summary.failed), description=stage(),
                                rate=(summary.tagged + len(summary.failed)) / elapsed)
                if run.stop is not None and run.stop():
                    raise _Stopped

            try:
                run._rescore_cached(cached, tagger, sinks, loaded.vocab_version, advance)
                (run.runner or tag_files)([f.path for f in todo], tagger, sinks, batch_size, workers,
                                          vocab_version=loaded.vocab_version, on_batch=advance, skip=skip,
                                          decode=self.decode)
            except _Stopped:
                pass
        if tagger.checking:
            self.precision_note = "fp32 (auto: too few photos decoded to finish the fast-path check)"
        summary.precision = self.precision_note

    def _precision_check(self, photos: int) -> dict:
        """Tagger arguments of the CPU's auto check: how many photos, the cache key of this model
        file on this CPU, and where the decision is reported (now, and in the summary). A first
        job smaller than the check stays fp32; `photos` 0 is a session of unknown length
        (`ramcli watch`), which checks on the first photos that arrive."""
        if self.precision != "auto":
            return {}
        from ramcli.models import resolve_weights
        from ramcli.tagging.precision import DecisionCache

        run = self.run

        def report(decision) -> None:
            checked = ", checked before" if decision.cached else ""
            self.precision_note = f"{decision.precision} (auto{checked}: {decision.reason})"
            if not run.quiet and not decision.cached:  # the measurements once; later runs name them in the summary
                self.err.print(decision.describe(), markup=False, highlight=False)

        enough = photos == 0 or photos >= run.precision_check
        return {"check_photos": run.precision_check if enough else 0, "on_decision": report,
                "cache_key": DecisionCache.key(resolve_weights(run.weights)[0]), "vocab_version": self.vocab.version}

    def load(self, photos: int = 0) -> _Loaded:
        """The model, its Tagger and the sinks that need it, once per session (and vocabulary);
        `photos`, the size of the first job, decides on compiling. `ramcli watch` calls it before
        the first photo arrives."""
        if self._loaded is not None:
            return self._loaded
        from ramcli.models import load_model
        from ramcli.tagging.decision import read_threshold_file
        from ramcli.tagging.tagger import Tagger

        run, err = self.run, self.err
        model = load_model(run.weights, arch=run.arch, labels_dir=run.labels, device=self.device,
                           on_pull=lambda p: err.print(
                               f"downloading {p.name} ({p.size / 1e9:.1f} GB) from huggingface.co/{p.repo_id} …"))
        applied = self.vocab.apply_to_model(model)
        if run.runtime == "openvino":
            from ramcli.models import resolve_weights
            from ramcli.models.openvino_runtime import to_openvino

            model = to_openvino(model, resolve_weights(run.weights)[0], run.device, applied.version, on_convert=lambda: err.print(
                "converting the model for OpenVINO (once per model and vocabulary) …", markup=False, highlight=False))
        if applied.skipped_custom:
            err.print(f"warning: {model.arch.family} has a closed vocabulary and cannot score custom tags; "
                      f"not emitted: {', '.join(applied.skipped_custom)}", markup=False, highlight=False, soft_wrap=True)
        thresholds = read_threshold_file(run.threshold_file, len(model.labels)) if run.threshold_file else None
        cache = EmbeddingCache(model.model_id) if run.cache_embeddings else None
        captioner = run._load_captioner(model) if run.caption else None
        tagger = Tagger(model, self.device, self.precision, threshold=run.threshold, thresholds=thresholds,
                        exclude=run.exclude_tags, top_k=run.top_k, cache=cache,
                        compile=run._should_compile(self.device, photos), captioner=captioner,
                        **self._precision_check(photos))
        if run.write:
            self.metadata_sink(model.model_id)
        if self.index is not None:
            names, names_zh, n = model.labels.names, model.labels.names_zh, model.arch.num_classes
            self.index.upsert_tags(names[:n], names_zh[:n], "builtin")
            self.index.upsert_tags(names[n:], names_zh[n:], "custom")  # the vocabulary's, appended
        self._loaded = _Loaded(tagger, applied.version)
        return self._loaded
