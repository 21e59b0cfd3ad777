"""Write and settle: ExifTool writes the planned new versions, the journal puts them in place,
and the ledger is told exactly what the files now hold; after a kill, `recover` settles what a run
staged from what its files hold.

A new version that ExifTool warned about (it then may have stored less than it was given: a value
cut to a length limit) is read back and compared with its plan, and one that does not hold it is
never copied anywhere. Without a warning ExifTool stores what it was given (control characters
aside, which XMP cannot carry and no ramcli name holds), so the other new versions are not read
back: that read costs nearly as much as the write.
"""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path
from typing import Literal

from ramcli.fileio import atomic_write
from ramcli.journal import Change, Journal
from ramcli.library.ledger import Intent, Ledger
from ramcli.media.discover import what_is
from ramcli.metadata.exiftool import ExifToolProcess, Workspace, import_entry
from ramcli.metadata.layout import EMBED_FORMATS, SIDECAR_EXTENSION, embeds
from ramcli.metadata.options import WriterOptions
from ramcli.metadata.plan import (
    DESCRIPTION,
    DESCRIPTION_WRITE,
    LEDGER_ONLY_FIELDS,
    TargetPlan,
    WriteOutcome,
    as_list,
)
from ramcli.metadata.planner import Batch, Planner

# 'failed': the target is as it was. 'pending': the in-place copy was cut short; the journal
# completes it on the next start, and the ledger's staged rows wait for that.
WriteState = Literal["written", "failed", "pending"]


def write_targets(
    exiftools: list[ExifToolProcess | None], slot: int, journal: Journal, options: WriterOptions, batch: Batch,
    targets: list[TargetPlan],
) -> dict[str, tuple[WriteState, list[str]]]:
    """One ExifTool command (the process in `exiftools[slot]`) writes the new version of every target
    into the journal; each is
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
    out = journal.new_batch()
    sources = {t.target: batch.source(t.target) for t in ready}
    entries = [import_entry(sources[t.target], {**_import_values(t.new_values), **t.extra}) for t in ready]
    new_versions = {t.target: out / Path(sources[t.target]).name for t in ready}
    try:
        messages, errored = exiftools[slot].write(entries, batch.workspace.folder, out)
        warned = [t for t in ready if messages.get(sources[t.target]) and sources[t.target] not in errored
                  and new_versions[t.target].exists()]
        wrong = _verify(exiftools[slot], [(t, new_versions[t.target]) for t in warned])
    except Exception as exc:  # ExifTool died: it wrote into the journal folder only
        exiftools[slot].close()
        exiftools[slot] = None
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
        problem = _keep_backup(t) if options.keep_backups else None
        if problem:
            results[t.target] = ("failed", [f"Error: {problem}"])
            continue
        mtime = os.stat(t.target).st_mtime_ns if options.preserve_mtime and t.exists else None
        changes.append(Change(t.target, str(new_versions[t.target]), create=not t.exists, mtime_ns=mtime))
        notes[t.target] = lines
    for target, error in journal.commit(out, changes).items():
        if error is None:
            results[target] = ("written", notes[target])
        else:
            state: WriteState = "pending" if error.startswith("interrupted") else "failed"
            results[target] = (state, [f"Error: {error}", *notes.get(target, [])])
    return results



def _verify(process: ExifToolProcess, new_versions: list[tuple[TargetPlan, Path]]) -> dict[str, str]:
    """Read back new versions ExifTool wrote into the journal, before any is copied into place:
    per target whose new version does not hold its plan, why not."""
    found, _ = process.read([str(path) for _, path in new_versions])
    wrong = {}
    for t, path in new_versions:
        got = found.get(str(path))
        missing = [f for f, v in t.new_values.items() if got is None or as_list(got.get(f)) != v]
        if missing:
            wrong[t.target] = f"ExifTool did not store {', '.join(missing)} as planned (the file is unchanged)"
    return wrong



def _keep_backup(t: TargetPlan) -> str | None:
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



def settle(
    ledger: Ledger, batch: Batch, intents: dict[str, list[Intent]], results: dict[str, tuple[WriteState, list[str]]]
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
    ledger.settle(applied, [i for target in staged if target not in pending for i in intents[target]])
    return [outcomes[plan.path] for plan in batch.plans]



def recover(journal: Journal, ledger: Ledger, planner: Planner) -> int:
    """Resolve what a killed run staged and never settled, against what the files now hold
    (after the journal completed that run's writes).

    Returns the number of resolved intents. Targets that exist but cannot be read now, or whose
    write the journal could not complete yet (`Journal.waiting`), stay staged for a later run."""
    waiting = journal.waiting_targets
    intents = [i for i in ledger.staged() if i.entry.target not in waiting]
    if not intents:
        return 0
    existing = sorted({i.entry.target for i in intents if os.path.exists(i.entry.target)})
    extensions = {t: e for t in existing if (e := _extension(t))}
    batch = Batch([], {}, {}, extensions, Workspace(planner.workspaces))
    try:
        found, _ = planner.read(batch, list(extensions))
    finally:
        batch.workspace.close()
    decidable = [i for i in intents if i.entry.target in found or not os.path.exists(i.entry.target)]
    ledger.settle([i for i in decidable if _holds(i, found.get(i.entry.target))], decidable)
    return len(decidable)


def _extension(target: str) -> str | None:
    """The extension ExifTool sees a target under: a sidecar's, or its detected format's."""
    if target.lower().endswith(SIDECAR_EXTENSION):
        return SIDECAR_EXTENSION
    found = what_is(Path(target))
    return EMBED_FORMATS[found.format] if found is not None and embeds(found) else None



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
