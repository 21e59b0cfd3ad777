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
   writes each new version into the journal's batch folder (`-o`). A new version that ExifTool
   warned about (it then may have stored less than it was given: a value cut to a length limit)
   is read back and compared with its plan, and one that does not hold it is never copied
   anywhere. Without a warning ExifTool stores what it was given (control characters aside, which
   XMP cannot carry and no ramcli name holds), so the other new versions are not read back: that
   read costs nearly as much as the write.
   The journal then makes the new versions durable and copies each into its file in place, once
   the space for it is reserved (`ramcli.journal.Journal`): inode, hard links, extended
   attributes, owner and mode stay; a new sidecar is created atomically.
6. Settle, in one transaction: the staged changes of targets written go into the ledger. Failed
   targets, left as they were, are reported; the ledger is not told.

When a writer starts, it first completes what a killed run's journal holds, then settles what
that run staged from what the files now hold. When one call spans several batches, a second
ExifTool process writes batch k in a background thread while the first reads batch k+1.
"""

from __future__ import annotations

import os
import shutil
import stat
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from ramcli.config import home
from ramcli.fileio import atomic_write
from ramcli.journal import Change, Journal
from ramcli.library.ledger import Intent, Ledger, LedgerEntry
from ramcli.metadata.exiftool import ExifToolProcess, Workspace, import_entry
from ramcli.metadata.layout import (
    DIGEST_FORMATS,
    EMBED_FORMATS,
    IPTC_FORMATS,
    SIDECAR_EXTENSION,
    DirCache,
    belongs_to,
    embeds,
    is_raw,
    sidecar_targets,
    what_is,
)
from ramcli.metadata.options import WriterOptions
from ramcli.metadata.plan import (
    CREATED_SIDECAR,
    CURRENT_IPTC_DIGEST,
    DESCRIPTION,
    DESCRIPTION_WRITE,
    DIGEST_BEFORE,
    IN_SYNC,
    IPTC_DIGEST,
    IPTC_KEYWORDS,
    KEYWORD_FIELDS,
    LEDGER_ONLY_FIELDS,
    MANAGED_FIELDS,
    NO_DIGEST,
    SUBJECT,
    FieldChange,
    FilePlan,
    TargetPlan,
    WriteOutcome,
    as_list,
    clean_caption,
    description_elsewhere,
    iptc_seeds,
    iptc_stale,
    plan_description,
    plan_field,
    policy_applies,
    seed_values,
    wanted_values,
)
from ramcli.tagging.records import TagScore

# 'failed': the target is as it was. 'pending': the in-place copy was cut short; the journal
# completes it on the next start, and the ledger's staged rows wait for that.
WriteState = Literal["written", "failed", "pending"]
_Item = tuple[str | os.PathLike, Sequence[TagScore], str | None]  # (photo, tags, caption) in the writer
# Fields that every XMP file ExifTool writes carries: not content of the user's.
_BOILERPLATE = ("SourceFile", "XMP-x:XMPToolkit")


@dataclass
class _Batch:
    """One chunk of a call, from layout (targets, ledger rows) through reading and planning."""

    plans: list[FilePlan]
    wanted: dict[str, tuple[str, bool, list[TagScore], str | None]]  # target -> (photo, wanted there, tags, caption)
    rows: dict[str, list[LedgerEntry]]  # photo -> its ledger rows
    extensions: dict[str, str]  # target -> the extension ExifTool sees it under
    workspace: Workspace
    untag: bool = False
    formats: dict[str, str] = field(default_factory=dict)  # embedded target -> detected format

    @property
    def names(self) -> set[str]:
        """Every photo and target the chunk touches (two chunks overlap only when disjoint)."""
        return {p.path for p in self.plans} | set(self.wanted)

    def source(self, target: str) -> str:
        """The target's name in the workspace (what ExifTool is given)."""
        return self.workspace.link(target, self.extensions[target])

    def staged(self) -> list[TargetPlan]:
        """Targets whose ledger changes depend on a file operation (write, delete)."""
        return [t for p in self.plans if not p.error for t in p.targets if t.writes or t.delete]


class MetadataWriter:
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
        try:
            self._process(0)
            self.recovered = self._recover()
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> MetadataWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

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
    ) -> list[FilePlan]:
        """What `write_batch` would change, per photo (the dry run)."""
        return [plan for chunk in self._chunks(_with_captions(items, captions)) for plan in self._plan_only(chunk, False)]

    def plan_untag(self, paths: Sequence[str | os.PathLike]) -> list[FilePlan]:
        """What `untag_batch` would remove, per photo."""
        items = [(p, [], None) for p in paths]
        return [plan for chunk in self._chunks(items) for plan in self._plan_only(chunk, True)]

    def write_batch(
        self,
        items: Sequence[tuple[str | os.PathLike, Sequence[TagScore]]],
        model_id: str | None = None,
        captions: Sequence[str | None] | None = None,
    ) -> list[WriteOutcome]:
        """Merge the tags into each photo's metadata; one outcome per item, in order.

        `captions`, aligned with `items`: a caption for `XMP-dc:Description` per photo, or None
        to leave that photo's description as it is (see docs/metadata.md)."""
        return self._run(self._chunks(_with_captions(items, captions)), False, model_id)

    def untag_batch(self, paths: Sequence[str | os.PathLike]) -> list[WriteOutcome]:
        """Remove exactly the keywords and caption ramcli added (per the ledger) and nothing else."""
        return self._run(self._chunks([(p, [], None) for p in paths]), True, None)

    def _plan_only(self, chunk: list[_Item], untag: bool) -> list[FilePlan]:
        batch = self._layout(chunk, untag)
        try:
            return self._read_and_plan(batch)
        finally:
            batch.workspace.close()

    def _chunks(self, items: Sequence) -> list[list]:
        size = self.options.batch_size
        return [list(items[start : start + size]) for start in range(0, len(items), size)]

    def _layout(self, items: list[_Item], untag: bool) -> _Batch:
        """Plans with their targets, before anything is read (cheap: sniffing, directory listings)."""
        dirs = DirCache()
        latest = {os.path.realpath(p): (list(tags), caption) for p, tags, caption in items}  # repeated: last wins
        rows = self.ledger.entries_of(list(latest))
        plans: dict[str, FilePlan] = {}
        batch = _Batch([], {}, rows, {}, Workspace(self._workspaces), untag)
        for path, (tags, caption) in latest.items():
            plan = plans[path] = FilePlan(path)
            targets, plan.error = self._targets(Path(path), dirs, untag, {e.target for e in rows[path]})
            for target, wanted, extension, fmt in targets:
                key = str(target)
                if key in batch.wanted:  # two photos sharing one sidecar: first one keeps it
                    continue
                batch.wanted[key] = (path, wanted, tags, caption)
                batch.extensions[key] = extension
                if fmt:
                    batch.formats[key] = fmt
                plan.targets.append(TargetPlan(key, is_sidecar=target != Path(path), exists=target.exists()))
        batch.plans = [plans[os.path.realpath(p)] for p, _, _ in items]
        return batch

    def _targets(
        self, photo: Path, dirs: DirCache, untag: bool, known: set[str]
    ) -> tuple[list[tuple[Path, bool, str, str | None]], str | None]:
        """(target, wanted, extension, format) for a photo, or an error. Ledger targets come along
        unwanted, if they can belong to the photo at all."""
        known = {t for t in known if belongs_to(photo, t)}
        targets: list[tuple[Path, bool, str, str | None]] = []
        found = what_is(photo) if photo.is_file() and (not untag or str(photo) in known) else None
        if not untag:
            if found is None:
                return [], "file not found" if not photo.exists() else "cannot read it"
            photo_kind = found.kind in ("image", "raw")
            if photo_kind and (self.options.sidecar or is_raw(found)):
                targets = [(t, True, SIDECAR_EXTENSION, None) for t in sidecar_targets(photo, self.options, dirs, is_raw(found))]
            elif photo_kind and embeds(found):
                targets = [(photo, True, EMBED_FORMATS[found.format], found.format)]
            elif not known:
                if not photo_kind:
                    return [], found.reason or "not a photo"
                return [], f"{found.format or 'this format'} cannot hold embedded metadata (use --sidecar)"
        chosen = {str(t) for t, *_ in targets}
        for t in sorted(known - chosen):
            if t == str(photo):
                if found is not None and embeds(found):
                    targets.append((photo, False, EMBED_FORMATS[found.format], found.format))
            else:
                targets.append((Path(t), False, SIDECAR_EXTENSION, None))
        return targets, None

    def _read_and_plan(self, batch: _Batch) -> list[FilePlan]:
        """One ExifTool read for every existing target of the chunk, then the diff per target."""
        unique = {p.path: p for p in batch.plans}.values()  # a repeated photo is planned once
        readable = [t.target for p in unique for t in p.targets if t.exists]
        current_all, messages = self._read(batch, readable)
        for plan in unique:
            for t in plan.targets:
                path, wanted, tags, caption = batch.wanted[t.target]
                read_errors = [m for m in messages.get(t.target, []) if m.startswith("Error")]
                if t.exists and (t.target not in current_all or read_errors):
                    plan.error = plan.error or f"{Path(t.target).name}: " + (
                        read_errors[0] if read_errors else "ExifTool could not read it"
                    )
                    continue
                data = current_all.get(t.target, {})
                self._plan_target(t, path, data, tags if wanted else [], wanted, batch.rows[path], batch.formats.get(t.target))
                if caption is not None or batch.untag:  # None: the description is left alone
                    self._plan_caption(t, path, data, caption if wanted else None, batch.rows[path])
                if t.is_sidecar and not t.exists and t.new_values:
                    t.record.append(LedgerEntry(path, t.target, CREATED_SIDECAR, "1", False))
                if not wanted:
                    self._plan_deletion(t, path, data, batch.rows[path])
        return batch.plans

    def _read(self, batch: _Batch, targets: list[str]) -> tuple[dict[str, dict], dict[str, list[str]]]:
        """`ExifToolProcess.read` of targets, through the batch's workspace, keyed by target."""
        found, messages = self.exiftool.read([batch.source(t) for t in targets])
        real = batch.workspace.real
        return {real[n]: d for n, d in found.items() if n in real}, {real[n]: m for n, m in messages.items() if n in real}

    def _plan_target(
        self, t: TargetPlan, path: str, data: dict, tags: list[TagScore], wanted: bool,
        path_rows: list[LedgerEntry], fmt: str | None,
    ) -> None:
        current = {f: as_list(data.get(f)) for f in KEYWORD_FIELDS}
        rows: dict[str, dict[str, LedgerEntry]] = {}
        for e in path_rows:
            if e.target == t.target:
                rows.setdefault(e.field, {})[e.value] = e
        iptc = self._iptc_encoding(t, data, fmt) if wanted else None
        want = wanted_values(tags, self.options, current, iptc) if wanted else {}
        # The user's keywords: everything but ramcli's own tags (seeded copies are the user's).
        user = {f: [v for v in current[f] if not _ramcli_tag(rows.get(f, {}).get(v))] for f in KEYWORD_FIELDS}
        stale = iptc is not None and iptc_stale(data)
        for f in KEYWORD_FIELDS:
            seeds = seed_values(user, f) if wanted and not current[f] else []
            if f == SUBJECT and stale:
                seeds += iptc_seeds(user, current[f], iptc)
            known = rows.get(f, {})
            planned = plan_field(current[f], want.get(f, []), {v: e.preexisting for v, e in known.items()},
                                 {v for v, e in known.items() if e.seeded}, seeds)
            t.record += [LedgerEntry(path, t.target, f, v, v in current[f], seeded=v in planned.seeded)
                         for v in planned.record]
            t.forget += [known[v] for v in planned.forget]
            new = planned.new
            if new != current[f]:
                t.new_values[f] = new
                t.changes.append(
                    FieldChange(f, [v for v in new if v not in current[f]], [v for v in current[f] if v not in new])
                )
        if IPTC_KEYWORDS in t.new_values or stale:
            if iptc == "utf-8" or not any(k.startswith("IPTC:") for k in data):
                t.extra["IPTC:CodedCharacterSet"] = "UTF8"
            # MWG: a stale digest makes readers ignore the XMP, so refresh it (dc:subject holds the
            # IPTC's keywords by now). In TIFF/DNG ExifTool 12.57's "new" digest differs from its
            # CurrentIPTCDigest (padding), so there we only refresh a digest the file already has
            # and never create one.
            if fmt in DIGEST_FORMATS or IPTC_DIGEST in data:
                t.extra[IPTC_DIGEST] = "new"
        self._plan_digest_record(t, path, data, wanted, rows.get(DIGEST_BEFORE, {}))
        if not wanted:
            t.forget += list(rows.get(CREATED_SIDECAR, {}).values())

    def _plan_digest_record(
        self, t: TargetPlan, path: str, data: dict, wanted: bool, known: dict[str, LedgerEntry]
    ) -> None:
        """The digest a target had before ramcli first replaced it is recorded (`DIGEST_BEFORE`:
        none, in sync with the IPTC, or the stale value), and `untag` puts back that state, so
        that MWG readers choose between XMP and IPTC as they did before."""
        stored, now = data.get(IPTC_DIGEST), data.get(CURRENT_IPTC_DIGEST)
        if wanted:
            if IPTC_DIGEST in t.extra and not known:
                had = NO_DIGEST if not stored else IN_SYNC if stored == now else stored
                t.record.append(LedgerEntry(path, t.target, DIGEST_BEFORE, had, False))
            return
        if not known:
            return
        before = next(iter(known))
        t.extra.pop(IPTC_DIGEST, None)
        if before == IN_SYNC:  # recomputed: the same digest when the IPTC is back as it was
            if t.new_values or (stored and stored != now):
                t.extra[IPTC_DIGEST] = "new"
        elif before != (stored or NO_DIGEST):
            t.extra[IPTC_DIGEST] = [] if before == NO_DIGEST else before
        t.forget += list(known.values())

    def _plan_caption(
        self, t: TargetPlan, path: str, data: dict, caption: str | None, path_rows: list[LedgerEntry]
    ) -> None:
        """The caption's part of a target's plan (`plan_description`), after the keywords'."""
        current = as_list(data.get(DESCRIPTION))
        rows = {e.value: e for e in path_rows if e.target == t.target and e.field == DESCRIPTION}
        new, record, forget = plan_description(
            current[0] if current else None, description_elsewhere(data), caption,
            {v: e.preexisting for v, e in rows.items()},
        )
        t.record += [LedgerEntry(path, t.target, DESCRIPTION, v, False) for v in record]
        t.forget += [rows[v] for v in forget]
        new_list = [new] if new is not None else []
        if new_list != current:
            t.new_values[DESCRIPTION] = new_list
            t.changes.append(FieldChange(DESCRIPTION, new_list, current))

    def _plan_deletion(self, t: TargetPlan, path: str, data: dict, path_rows: list[LedgerEntry]) -> None:
        """Delete a sidecar only if ramcli created it for this photo (ledger), it sits at one of this
        photo's sidecar names, it is a plain file (not a link), and nothing but ramcli's (removed)
        values is in it. Otherwise only ramcli's values are removed and the file stays."""
        if not any(e.target == t.target and e.field == CREATED_SIDECAR for e in path_rows):
            return
        if not t.is_sidecar or not t.exists or not belongs_to(Path(path), t.target):
            return
        try:
            if not stat.S_ISREG(os.lstat(t.target).st_mode):
                return
        except OSError:
            return
        others = [k for k in data if k not in MANAGED_FIELDS and k not in _BOILERPLATE]
        left = any(t.new_values.get(f, as_list(data.get(f))) for f in MANAGED_FIELDS)
        t.delete = not others and not left

    def _iptc_encoding(self, t: TargetPlan, data: dict, fmt: str | None) -> str | None:
        """The encoding of IPTC keywords in this target, or None when IPTC is not written there."""
        if t.is_sidecar or fmt not in IPTC_FORMATS:
            return None
        has_iptc = any(k.startswith("IPTC:") for k in data)
        if not policy_applies(self.options.iptc, has_iptc):
            return None
        # Existing IPTC without a UTF-8 declaration is Latin-1: keep it so (FAQ 10), rather than
        # re-declaring a record whose other fields are Latin-1 bytes.
        if has_iptc and data.get("IPTC:CodedCharacterSet") != "UTF8":
            return "latin-1"
        return "utf-8"

    # writing

    def _run(self, chunks: list[list], untag: bool, model_id: str | None) -> list[WriteOutcome]:
        """Each chunk: stage, write, settle. While ExifTool writes chunk k in the background
        process, the reader process reads chunk k+1 and it is planned, unless the two chunks share
        a photo or target (then k+1 is laid out and read only after k is settled)."""
        outcomes: list[WriteOutcome] = []
        batch = self._layout(chunks[0], untag) if chunks else None
        if batch is not None:
            self._read_and_plan(batch)
        for k in range(len(chunks)):
            following = self._layout(chunks[k + 1], untag) if k + 1 < len(chunks) else None
            overlap = following is not None and not (following.names & batch.names)
            intents = self._stage(batch, model_id)
            targets = [t for t in batch.staged() if t.writes]
            if overlap:
                if self._background is None:
                    self._background = ThreadPoolExecutor(1, thread_name_prefix="ramcli-exiftool")
                self._process(1)
                job = self._background.submit(self._write_targets, batch, targets, 1)
                try:
                    self._read_and_plan(following)
                finally:
                    results = job.result()  # never leave a write running unaccounted for
            else:
                self._process(0)
                results = self._write_targets(batch, targets, 0)
            outcomes += self._settle(batch, intents, results)
            batch.workspace.close()
            if following is not None and not overlap:  # laid out before chunk k changed the files
                following.workspace.close()
                following = self._layout(chunks[k + 1], untag)
                self._read_and_plan(following)
            batch = following
        return outcomes

    def _stage(self, batch: _Batch, model_id: str | None) -> dict[str, list[Intent]]:
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

    def _write_targets(
        self, batch: _Batch, targets: list[TargetPlan], slot: int
    ) -> dict[str, tuple[WriteState, list[str]]]:
        """One ExifTool command writes the new version of every target into the journal; each is
        put into place if it holds its plan (read back where ExifTool warned): per target its
        state (`WriteState`) and its error/warning lines."""
        results: dict[str, tuple[WriteState, list[str]]] = {}
        ready = []
        for t in targets:
            problem = _unwritable(Path(t.target), t.exists)
            if problem:
                results[t.target] = ("failed", [f"Error: {problem}"])
            else:
                ready.append(t)
        if not ready:
            return results
        out = self.journal.new_batch()
        sources = {t.target: batch.source(t.target) for t in ready}
        entries = [import_entry(sources[t.target], {**_import_values(t.new_values), **t.extra}) for t in ready]
        new_versions = {t.target: out / Path(sources[t.target]).name for t in ready}
        try:
            messages, errored = self._exiftools[slot].write(entries, batch.workspace.folder, out)
            warned = [t for t in ready if messages.get(sources[t.target]) and sources[t.target] not in errored
                      and new_versions[t.target].exists()]
            wrong = self._verify(slot, [(t, new_versions[t.target]) for t in warned])
        except Exception as exc:  # ExifTool died: it wrote into the journal folder only
            self._exiftools[slot].close()
            self._exiftools[slot] = None
            shutil.rmtree(out, ignore_errors=True)
            return {**results, **{t.target: ("failed", [f"Error: ExifTool failed: {exc}"]) for t in ready}}
        changes, notes = [], {}
        for t in ready:
            source = sources[t.target]
            lines = messages.get(source, [])
            if source in errored or any(m.startswith("Error") for m in lines) or not new_versions[t.target].exists():
                if not any(m.startswith("Error") for m in lines):
                    lines.insert(0, "Error: ExifTool could not write it")
                results[t.target] = ("failed", lines)
                continue
            if t.target in wrong:
                results[t.target] = ("failed", [f"Error: {wrong[t.target]}", *lines])
                continue
            problem = self._keep_backup(t) if self.options.keep_backups else None
            if problem:
                results[t.target] = ("failed", [f"Error: {problem}"])
                continue
            mtime = os.stat(t.target).st_mtime_ns if self.options.preserve_mtime and t.exists else None
            changes.append(Change(t.target, str(new_versions[t.target]), create=not t.exists, mtime_ns=mtime))
            notes[t.target] = lines
        for target, error in self.journal.commit(out, changes).items():
            if error is None:
                results[target] = ("written", notes[target])
            else:
                state: WriteState = "pending" if error.startswith("interrupted") else "failed"
                results[target] = (state, [f"Error: {error}", *notes.get(target, [])])
        return results

    def _verify(self, slot: int, new_versions: list[tuple[TargetPlan, Path]]) -> dict[str, str]:
        """Read back new versions ExifTool wrote into the journal, before any is copied into place:
        per target whose new version does not hold its plan, why not."""
        found, _ = self._exiftools[slot].read([str(path) for _, path in new_versions])
        wrong = {}
        for t, path in new_versions:
            got = found.get(str(path))
            missing = [f for f, v in t.new_values.items() if got is None or as_list(got.get(f)) != v]
            if missing:
                wrong[t.target] = f"ExifTool did not store {', '.join(missing)} as planned (the file is unchanged)"
        return wrong

    def _keep_backup(self, t: TargetPlan) -> str | None:
        """`FILE_original`, a copy of the file as it was (an existing one, the oldest, is kept)."""
        if not t.exists:
            return None
        backup = t.target + "_original"
        try:
            with open(t.target, "rb") as fh:
                atomic_write(backup, fh.read(), exclusive=True)
            shutil.copystat(t.target, backup)
        except FileExistsError:
            return None
        except OSError as exc:
            return f"cannot keep a backup: {(exc.strerror or str(exc)).lower()}"
        return None

    def _settle(
        self, batch: _Batch, intents: dict[str, list[Intent]], results: dict[str, tuple[WriteState, list[str]]]
    ) -> list[WriteOutcome]:
        """Outcomes per photo, and the ledger told exactly what the files now hold (one commit)."""
        staged = {t.target: t for t in batch.staged()}
        applied: list[Intent] = []
        pending: set[str] = set()
        outcomes: dict[str, WriteOutcome] = {}
        for plan in batch.plans:
            if plan.path in outcomes:  # a repeated photo: the same outcome again
                continue
            outcome = outcomes[plan.path] = WriteOutcome(plan.path, "unchanged", changes=plan.changes)
            if plan.error:
                outcome.status, outcome.error = "failed", plan.error
                continue
            failures = []
            for t in plan.targets:
                state, lines = results.get(t.target, ("written", []))
                if t.delete:
                    state, lines = _delete(t.target)
                if state == "written":
                    applied += intents[t.target]
                elif state == "pending":
                    pending.add(t.target)
                outcome.warnings += [f"{Path(t.target).name}: {m}" for m in lines if not m.startswith("Error")]
                if state in ("failed", "pending"):
                    failed = next(m for m in lines if m.startswith("Error"))
                    failures.append(f"{Path(t.target).name}: {failed.removeprefix('Error: ')}")
                elif t.target in staged:
                    outcome.status = "written"
                    if t.target == plan.path:
                        st = os.stat(t.target)
                        outcome.size, outcome.mtime_ns = st.st_size, st.st_mtime_ns
            if failures:
                outcome.status, outcome.error = "failed", "; ".join(failures)
        self.ledger.settle(applied, [i for target in staged if target not in pending for i in intents[target]])
        return [outcomes[plan.path] for plan in batch.plans]

    def _recover(self) -> int:
        """Resolve what a killed run staged and never settled, against what the files now hold
        (after the journal completed that run's writes).

        Returns the number of resolved intents. Targets that exist but cannot be read now, or whose
        write the journal could not complete yet (`Journal.waiting`), stay staged for a later run."""
        waiting = self.journal.waiting_targets
        intents = [i for i in self.ledger.staged() if i.entry.target not in waiting]
        if not intents:
            return 0
        existing = sorted({i.entry.target for i in intents if os.path.exists(i.entry.target)})
        extensions = {t: e for t in existing if (e := _extension(t))}
        batch = _Batch([], {}, {}, extensions, Workspace(self._workspaces))
        try:
            found, _ = self._read(batch, list(extensions))
        finally:
            batch.workspace.close()
        decidable = [i for i in intents if i.entry.target in found or not os.path.exists(i.entry.target)]
        self.ledger.settle([i for i in decidable if _holds(i, found.get(i.entry.target))], decidable)
        return len(decidable)


def _ramcli_tag(entry: LedgerEntry | None) -> bool:
    """Whether a ledger row says its value is one of ramcli's tags (not the user's, not a seed)."""
    return entry is not None and not entry.preexisting and not entry.seeded


def _extension(target: str) -> str | None:
    """The extension ExifTool sees a target under: a sidecar's, or its detected format's."""
    if target.lower().endswith(SIDECAR_EXTENSION):
        return SIDECAR_EXTENSION
    found = what_is(Path(target))
    return EMBED_FORMATS[found.format] if found is not None and embeds(found) else None


def _with_captions(
    items: Sequence[tuple[str | os.PathLike, Sequence[TagScore]]], captions: Sequence[str | None] | None
) -> list[_Item]:
    if captions is None:
        return [(p, tags, None) for p, tags in items]
    if len(captions) != len(items):
        raise ValueError(f"{len(captions)} captions for {len(items)} photos: pass one per photo (None for none)")
    return [(p, tags, clean_caption(c)) for (p, tags), c in zip(items, captions)]


def _import_values(new_values: dict[str, list[str]]) -> dict[str, list[str] | str]:
    """The new lists as ExifTool's JSON import takes them: the caption as its x-default item
    (a text; an empty list deletes that item and no other language)."""
    out: dict[str, list[str] | str] = {f: v for f, v in new_values.items() if f != DESCRIPTION}
    if DESCRIPTION in new_values:
        out[DESCRIPTION_WRITE] = new_values[DESCRIPTION][0] if new_values[DESCRIPTION] else []
    return out


def _holds(intent: Intent, data: dict | None) -> bool:
    """Whether a target as it is now (`data` read from it; None: gone) bears the intent out:
    a value to add is there, a value to remove is gone (a user's value may always be forgotten)."""
    e = intent.entry
    present = data is not None and (e.field in LEDGER_ONLY_FIELDS or e.value in as_list(data.get(e.field)))
    return (e.preexisting or not present) if intent.remove else present


def _delete(target: str) -> tuple[WriteState, list[str]]:
    """Delete a sidecar ramcli created that holds nothing else any more."""
    try:
        os.remove(target)
    except FileNotFoundError:
        return "written", []
    except OSError as exc:
        return "failed", [f"Error: cannot delete: {exc.strerror}"]
    return "written", []


def _unwritable(target: Path, exists: bool) -> str | None:
    """Why ramcli will not write this file, if it will not: a file the user made read-only is a
    request to leave it alone (also for root), and ramcli never writes through a link."""
    if exists:
        st = os.lstat(target)
        if stat.S_ISLNK(st.st_mode):
            return "a symbolic link (ramcli does not write through it)"
        if not stat.S_ISREG(st.st_mode):
            return "not a regular file"
        if not st.st_mode & 0o222:
            return "read-only file (make it writable, or use --sidecar)"
    elif not os.access(target.parent, os.W_OK):
        return "cannot create a sidecar: folder not writable"
    return None
