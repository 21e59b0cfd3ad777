"""One `ramcli tag` run, step by step: discover, due, load, tag, write the unwritten, report.

Order matters for resumability: each batch is recorded in the index in one transaction after
its results were written into the files and printed, so a run killed at any moment resumes with
the photos of the batch in flight and nothing else. Before any of that, each photo's file is
checked to still be the one that was decoded, and each failure is judged (`sinks.Triage`).

A `TagSession` holds what outlives one run (the index, the loaded model, ExifTool, the output):
`ramcli tag` runs once in it (`execute`), `ramcli watch` once per group of photos that arrive
(`run_pass`). It reports to a `Listener` and prints nothing itself.

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
import time
from collections import Counter
from collections.abc import Callable

from ramcli.closing import Closing
from ramcli.errors import UsageError
from ramcli.library.writeback import unwritten
from ramcli.media.discover import PHOTO_KINDS, Found, discover
from ramcli.tagging.listener import Listener, Summary
from ramcli.tagging.options import TagOptions
from ramcli.tagging.records import PhotoResult
from ramcli.tagging.sinks import OUTSIDE_LINK, MetadataSink, Moves, Triage, count_tagged
from ramcli.tagging.tagger_setup import Loaded, load_tagger

#: Jobs of up to this many photos are decoded in-process: starting the decode worker processes
#: takes longer than decoding them (measured with `ramcli watch`, one 12 MP JPEG per job: 4-8 s
#: per job with 2 workers on the busy 2-core machine, 0.25 s in-process).
IN_PROCESS_UP_TO = 8


class _Stopped(Exception):
    """Raised between batches when `TagSession.stop` says so."""


class TagSession(Closing):
    """What outlives one run over a list of photos: the index, the model, the ExifTool writer and
    the output stream. `ramcli tag` runs once in a session; `ramcli watch` keeps one open and runs
    once per group of new or changed photos, so the model is loaded once (on first need: a run
    with nothing to tag never loads it). A context manager.

    `stop`: asked after each batch; True ends the job there, the batch in flight written and
    recorded (`ramcli watch` stops this way on Ctrl-C or SIGTERM). `runner`: runs the model over
    the due photos, with `ramcli.tagging.pipeline.tag_files`'s signature; None is the local
    pipeline (`ramcli.tagging.on_ray` sets a Ray Data one, recorded by the same sinks).
    """

    def __init__(self, options: TagOptions, listener: Listener | None = None,
                 stop: Callable[[], bool] | None = None, runner: Callable | None = None):
        from ramcli.models import model_id_of
        from ramcli.models.onnx import is_onnx
        from ramcli.models.openvino_runtime import is_ir
        from ramcli.tagging.pipeline import resolve_decode, resolve_device
        from ramcli.tagging.precision import resolve_precision
        from ramcli.tagging.vocab import Vocabulary

        options.validate()
        self.options, self.listener = options, listener or Listener()
        self.stop, self.runner = stop, runner
        # OpenVINO's devices (cpu, gpu, npu) are its own, and a converted graph (.onnx, .xml) runs on
        # its runtime's CPU even where auto would pick a GPU; PyTorch then only prepares pixels
        weights = options.weights or ""
        converted = options.device == "auto" and (is_onnx(weights) or is_ir(weights))
        self.device = resolve_device("cpu" if options.runtime == "openvino" or converted else options.device)
        self.precision = resolve_precision(self.device, options.precision)
        self.precision_note = self.precision if self.precision != "auto" else ""  # for the summary
        self.decode = resolve_decode(self.device, options.decode)
        self.vocab = Vocabulary.open()
        self.model_id = model_id_of(options.weights)
        self.index = None
        if options.use_index:
            from ramcli.library.index import Index

            self.index = Index.open(options.index_path)
        self._loaded: Loaded | None = None
        self._output = None
        self._metadata: MetadataSink | None = None

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

    # ------------------------------------------------------------------ `ramcli tag`
    def execute(self) -> int:
        """One run over the options' paths; returns the number of new failures: photos not
        tagged (broken, not a photo) or whose metadata write failed, that the index did not
        already hold as failed in the same way. A dry run tells the listener what is due."""
        start = time.monotonic()
        found, counts = self.discover()
        photos = self.shard([f for f in found if f.kind in PHOTO_KINDS])
        summary = Summary(skipped=Counter({k: v for k, v in counts.items() if k not in PHOTO_KINDS and k != "error"}))
        reported = self.shard([f for f in found if f.kind in ("error", "link")])
        errors = [f for f in reported if f.kind == "error"]
        summary.not_followed = [(str(f.path), f.reason or f.kind) for f in reported if f.kind != "error"]
        if self.options.dry_run:
            todo = self.due(photos, summary)
            summary.unchanged = len(photos) - len(todo) - summary.broken_skipped
            self.listener.planned(todo, summary, errors)
            return 0
        self.run_pass(photos, errors, summary)
        self.listener.reported(summary, time.monotonic() - start, self.options.write)
        return summary.problems

    def discover(self) -> tuple[list[Found], Counter]:
        """What the walk of the options' paths found: the photos and what it reports (broken
        files, folder links not walked), with how many it found of each kind."""
        for p in self.options.paths:
            if not p.exists() and not p.is_symlink():
                raise UsageError(f"no such file or folder: {p}")
        found = list(discover(self.options.paths, self.options.include, self.options.exclude,
                              follow_links=self.options.follow_links))
        return [f for f in found if f.kind in PHOTO_KINDS or f.kind in ("error", "link")], Counter(f.kind for f in found)

    @staticmethod
    def shard(found: list[Found]) -> list[Found]:
        """Under torchrun, each rank takes every WORLD_SIZE-th photo (and reports every
        WORLD_SIZE-th problem, so each is listed once)."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        return found[rank::world] if world > 1 else found

    def run_pass(self, photos: list[Found], errors: list[Found], summary: Summary) -> None:
        """One pass over discovered files, the same for `ramcli tag` and each group of arrivals in
        `ramcli watch`: broken files reported, due photos tagged, failed writes retried."""
        self.report_errors(errors, summary)
        todo = self.due(photos, summary)
        summary.unchanged = len(photos) - len(todo) - summary.broken_skipped
        due = {f.path for f in todo}
        self.write_unwritten([f for f in photos if f.path not in due], summary)
        self.tag(todo, summary)
        self.end_output()

    # ------------------------------------------------------------------ steps
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
        if self.index is None or self.options.force:
            return list(photos)
        todo = []
        for f in photos:
            state = self.index.state(str(f.path), f.size, f.mtime_ns, self.model_id, self.vocab.version)
            if state == "due" or (state == "broken" and self.options.retry_broken):
                todo.append(f)
            elif state == "broken" and summary is not None:
                summary.broken_skipped += 1
        return todo

    def metadata_sink(self, model_id: str) -> MetadataSink:
        """The session's one metadata sink (an ExifTool process and a journal) for the model
        `model_id`, made on first need; each `tag` sets its summary and the paths it leaves alone."""
        if self._metadata is None:
            from ramcli.library.ledger import Ledger
            from ramcli.metadata import MetadataWriter, WriterOptions

            options = self.options.writer_options or WriterOptions(lang=self.options.lang)
            self._metadata = MetadataSink(MetadataWriter(options, Ledger(self.index.db)), model_id,
                                          Summary(), self.index)
        return self._metadata

    def output(self):
        """The run's result writer, opened on first need."""
        if self._output is None:
            from ramcli.output import result_writer

            self._output = result_writer(self.options.fmt, self.options.output, self.options.lang)
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
        retry = self.options.retry_broken or self.options.force
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
        options, index = self.options, self.index
        if not (options.write and index is not None and unchanged):
            return
        from ramcli.library.index import normalize_path
        from ramcli.library.writeback import write_indexed

        pending = index.pending_writes()  # path -> why the last write failed; usually none
        paths = [path for f in unchanged if (path := normalize_path(f.path)) in pending] if pending else []
        links = [str(f.path) for f in unchanged if f.link is not None] if options.follow_links else []
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

    def tag(self, todo: list[Found], summary: Summary) -> None:
        """Tag `todo` batch by batch through every sink (triage, metadata, output, index), telling
        the listener after each; photos the index knows under a path that is gone are re-pointed.
        Photos reached through a symlink out of the tagged folders are indexed with their link
        and, unless --follow-links, not written."""
        from ramcli.tagging.pipeline import default_batch_size, default_workers, tag_files

        if not todo:
            return
        options, index, listener = self.options, self.index, self.listener
        links = {str(f.path): str(f.link) for f in todo if f.link is not None}
        triage = Triage(todo, index, summary)  # before anything is decoded
        loaded = self.load(len(todo))
        tagger = loaded.tagger
        cached, todo = split_cached(todo, index, tagger.model.model_id, tagger.cache)
        summary.rescored += len(cached)
        moves = Moves(index, summary) if index is not None else None
        sinks = [moves, triage] if moves is not None else [triage]
        if self._metadata is not None:
            self._metadata.summary = summary
            self._metadata.left_alone = {} if options.follow_links else dict.fromkeys(links, OUTSIDE_LINK)
            self._metadata.found = {str(f.path): f for f in todo}
            sinks.append(self._metadata)
        sinks.append(self.output())  # after the write, so a line shows a write's failure too
        if index is not None:
            sinks.append(lambda results: index.record_batch(results, links=links))
        sinks.append(lambda results: count_tagged(results, summary))
        batch_size = options.batch_size or default_batch_size(self.device)
        workers = options.workers
        if workers is None:
            workers = 0 if len(todo) <= IN_PROCESS_UP_TO else default_workers()

        def stage() -> str:  # auto's check scores the first photos twice: say so, not a stalled rate
            return "checking precision" if tagger.checking else "tagging"

        shown = [stage()]

        def advance(done: int, failed: int) -> None:
            if stage() != shown[-1]:
                shown.append(stage())
                listener.stage(shown[-1])
            listener.advanced(done, summary.failures)
            if self.stop is not None and self.stop():
                raise _Stopped

        listener.started(len(todo) + len(cached), shown[-1])
        try:
            rescore_cached(cached, tagger, sinks, loaded.vocab_version, advance)
            (self.runner or tag_files)([f.path for f in todo], tagger, sinks, batch_size, workers,
                                       vocab_version=loaded.vocab_version, on_batch=advance,
                                       skip=moves.skip if moves is not None else None,
                                       decode=self.decode)
        except _Stopped:
            pass
        finally:
            listener.ended()
        if moves is not None:
            moves.apply()  # photos skipped after the last batch with results
        if tagger.checking:
            self.precision_note = "fp32 (auto: too few photos decoded to finish the fast-path check)"
        summary.precision = self.precision_note

    def load(self, photos: int = 0) -> Loaded:
        """The model, its Tagger and the sinks that need it, once per session (and vocabulary);
        `photos`, the size of the first job, decides on compiling. `ramcli watch` calls it before
        the first photo arrives."""
        if self._loaded is not None:
            return self._loaded
        loaded = load_tagger(self.options, self.device, self.precision, self.vocab, self.listener, photos,
                             self.precision_check(photos))
        model = loaded.tagger.model
        if self.options.write:
            self.metadata_sink(model.model_id)
        if self.index is not None:
            names, names_zh, n = model.labels.names, model.labels.names_zh, model.arch.num_classes
            self.index.upsert_tags(names[:n], names_zh[:n], "builtin")
            self.index.upsert_tags(names[n:], names_zh[n:], "custom")  # the vocabulary's, appended
        self._loaded = loaded
        return loaded

    def precision_check(self, photos: int) -> dict:
        """Tagger arguments of the CPU's auto check: how many photos, the cache key of this model
        file on this CPU, and where the decision is reported (now, and in the summary). A first
        job smaller than the check stays fp32; `photos` 0 is a session of unknown length
        (`ramcli watch`), which checks on the first photos that arrive."""
        if self.precision != "auto":
            return {}
        from ramcli.models import resolve_weights
        from ramcli.tagging.precision import DecisionCache

        options = self.options

        def report(decision) -> None:
            checked = ", checked before" if decision.cached else ""
            self.precision_note = f"{decision.precision} (auto{checked}: {decision.reason})"
            if not decision.cached:  # the measurements once; later runs name them in the summary
                self.listener.note(decision.describe())

        enough = photos == 0 or photos >= options.precision_check
        return {"check_photos": options.precision_check if enough else 0, "on_decision": report,
                "cache_key": DecisionCache.key(resolve_weights(options.weights)[0]), "vocab_version": self.vocab.version}


def split_cached(todo: list[Found], index, model_id: str, cache) -> tuple[list, list[Found]]:
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


def rescore_cached(cached: list, tagger, sinks, vocab_version: str, advance, chunk: int = 256) -> None:
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
