"""The transactional writer: read, plan, stage, write, settle, one batch of photos at a time.

How a batch runs, and why:

1. Layout: the targets of each photo (`ramcli.metadata.layout`): the photo itself or its XMP
   sidecars, by what discovery says the photo is. Targets the ledger knows from earlier runs come
   along (so that switching modes moves ramcli's keywords), but only names that can belong to the
   photo: a ledger row that names another file is never acted on.
2. Read: one ExifTool command reads every field of every target, in full (`ExifToolProcess.read`).
3. Plan, in Python: the per-field diff from the current values, the ledger and the wanted tags
   (`plan_field`) and caption (`plan_description`). Files whose fields would not change are not
   touched at all, so a re-run is a no-op.
4. Stage: the ledger changes that hang on the write are committed to the staging table, so that
   a kill during the write cannot leave ramcli keywords the ledger does not know (ramcli/library/ledger.py).
5. Write: one ExifTool command imports every changed target's new lists from a JSON file and
   writes each new version into the journal's batch folder (`-o`); a new version that ExifTool
   warned about is read back first. The journal then makes the new versions durable and copies
   each into its file in place, once the space for it is reserved (`ramcli.journal.Journal`):
   inode, hard links, extended attributes, owner and mode stay; a new sidecar is created atomically.
6. Settle, in one transaction: the staged changes of targets written go into the ledger. Failed
   targets, left as they were, are reported; the ledger is not told.

Steps 1-3 are `ramcli.metadata.planner`, 5-6 `ramcli.metadata.commit`; this module runs them and
stages (4). When a writer starts, it first completes what a killed run's journal holds, then
settles what that run staged from what the files now hold (`commit.recover`). When one call spans
several batches, a second ExifTool process writes batch k in a background thread while the first
reads batch k+1.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

from ramcli.closing import Closing
from ramcli.config import home
from ramcli.journal import Journal
from ramcli.library.ledger import Intent, Ledger
from ramcli.media.discover import Found, Sniffed
from ramcli.metadata.commit import recover, settle, write_targets
from ramcli.metadata.exiftool import ExifToolProcess
from ramcli.metadata.options import WriterOptions
from ramcli.metadata.plan import FilePlan, WriteOutcome
from ramcli.metadata.planner import Batch, Item, Planner, as_items
from ramcli.tagging.records import TagScore


class MetadataWriter(Closing):
    """Plans and writes keyword metadata for batches of photos; see the module docstring.

    `journal`: the folder of the redo journal (default: `journal` in RAMCLI_HOME)."""

    def __init__(self, options: WriterOptions, ledger: Ledger, journal: str | os.PathLike | None = None):
        self.options = options
        self.ledger = ledger
        self.journal = Journal(journal or home().root / "journal")  # completes a killed run's writes
        self._exiftools: list[ExifToolProcess | None] = [None, None]  # [reader, background writer]
        self._background: ThreadPoolExecutor | None = None
        # The batches' workspaces live in this process's journal session, so that a killed run's
        # symlinks to the user's photos go with its session when the next journal opens.
        self._workspaces = self.journal.folder / "workspaces"
        self._workspaces.mkdir()
        self.planner = Planner(options, ledger, self._workspaces, lambda: self._process(0))
        try:
            self._process(0)
            self.recovered = recover(self.journal, self.ledger, self.planner)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self._background is not None:
            self._background.shutdown(wait=True)
        for process in self._exiftools:
            if process is not None:
                process.close()
        shutil.rmtree(self._workspaces, ignore_errors=True)
        self.journal.close()

    @property
    def exiftool(self) -> ExifToolProcess:
        """The process that reads (and writes when nothing runs beside the write)."""
        return self._process(0)

    def _process(self, slot: int) -> ExifToolProcess:
        """The ExifTool process in `slot`, started if needed. Only the main thread starts them:
        PyExifTool ties each process to the life of the thread that started it (PDEATHSIG)."""
        process = self._exiftools[slot]
        if process is None:
            process = self._exiftools[slot] = ExifToolProcess(self.options.exiftool)
        return process

    # planning

    def plan_batch(
        self,
        items: Sequence[tuple[str | os.PathLike, Sequence[TagScore]]],
        captions: Sequence[str | None] | None = None,
        kinds: Sequence[Sniffed | Found | None] | None = None,
    ) -> list[FilePlan]:
        """What `write_batch` would change, per photo (the dry run)."""
        chunks = self._chunks(as_items(items, captions, kinds))
        return [plan for chunk in chunks for plan in self._plan_only(chunk, False)]

    def plan_untag(self, paths: Sequence[str | os.PathLike]) -> list[FilePlan]:
        """What `untag_batch` would remove, per photo."""
        items = [(p, [], None, None) for p in paths]
        return [plan for chunk in self._chunks(items) for plan in self._plan_only(chunk, True)]

    def write_batch(
        self,
        items: Sequence[tuple[str | os.PathLike, Sequence[TagScore]]],
        model_id: str | None = None,
        captions: Sequence[str | None] | None = None,
        kinds: Sequence[Sniffed | Found | None] | None = None,
    ) -> list[WriteOutcome]:
        """Merge the tags into each photo's metadata; one outcome per item, in order.

        `captions`, aligned with `items`: a caption for `XMP-dc:Description` per photo, or None
        to leave that photo's description as it is (see docs/metadata.md). `kinds`, aligned with
        `items`: what discovery found each photo is (its `Found`), so that it is not sniffed
        again; None asks `discover.what_is`."""
        return self._run(self._chunks(as_items(items, captions, kinds)), False, model_id)

    def untag_batch(self, paths: Sequence[str | os.PathLike]) -> list[WriteOutcome]:
        """Remove exactly the keywords and caption ramcli added (per the ledger) and nothing else."""
        return self._run(self._chunks([(p, [], None, None) for p in paths]), True, None)

    def _plan_only(self, chunk: list[Item], untag: bool) -> list[FilePlan]:
        batch = self.planner.layout(chunk, untag)
        try:
            return self.planner.read_and_plan(batch)
        finally:
            batch.workspace.close()

    def _chunks(self, items: Sequence) -> list[list]:
        size = self.options.batch_size
        return [list(items[start : start + size]) for start in range(0, len(items), size)]

    # writing

    def _run(self, chunks: list[list], untag: bool, model_id: str | None) -> list[WriteOutcome]:
        """Each chunk: stage, write, settle. While ExifTool writes chunk k in the background
        process, the reader process reads chunk k+1 and it is planned, unless the two chunks share
        a photo or target (then k+1 is laid out and read only after k is settled)."""
        outcomes: list[WriteOutcome] = []
        batch = self.planner.layout(chunks[0], untag) if chunks else None
        if batch is not None:
            self.planner.read_and_plan(batch)
        for k in range(len(chunks)):
            following = self.planner.layout(chunks[k + 1], untag) if k + 1 < len(chunks) else None
            overlap = following is not None and not (following.names & batch.names)
            intents = self._stage(batch, model_id)
            targets = [t for t in batch.staged() if t.writes]
            if overlap:
                if self._background is None:
                    self._background = ThreadPoolExecutor(1, thread_name_prefix="ramcli-exiftool")
                self._process(1)
                job = self._background.submit(write_targets, self._exiftools, 1, self.journal, self.options, batch, targets)
                try:
                    self.planner.read_and_plan(following)
                finally:
                    results = job.result()  # never leave a write running unaccounted for
            else:
                self._process(0)
                results = write_targets(self._exiftools, 0, self.journal, self.options, batch, targets)
            outcomes += settle(self.ledger, batch, intents, results)
            batch.workspace.close()
            if following is not None and not overlap:  # laid out before chunk k changed the files
                following.workspace.close()
                following = self.planner.layout(chunks[k + 1], untag)
                self.planner.read_and_plan(following)
            batch = following
        return outcomes

    def _stage(self, batch: Batch, model_id: str | None) -> dict[str, list[Intent]]:
        """The ledger intents per target, stamped with the model; those that hang on a file
        operation are committed to the staging table before it starts."""
        intents: dict[str, list[Intent]] = {}
        for plan in batch.plans:
            if plan.error:
                continue
            for t in plan.targets:
                intents[t.target] = [
                    Intent(replace(e, model_id=model_id)) for e in t.record
                ] + [Intent(e, remove=True) for e in t.forget]
        self.ledger.stage([i for t in batch.staged() for i in intents[t.target]])
        return intents
