"""Layout, read and plan: what each photo's targets should hold, before anything is written.

A batch is laid out first (cheap: sniffing, directory listings, the ledger's rows): the targets
of each photo (`ramcli.metadata.layout`) and the ledger targets that may belong to it. Then one
ExifTool command reads every existing target in full, and the per-field diff is planned in Python
(`ramcli.metadata.plan`). Nothing here writes a file or the ledger.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ramcli.library.ledger import Ledger, LedgerEntry
from ramcli.media.discover import PHOTO_KINDS, Found, Sniffed, what_is
from ramcli.metadata.exiftool import ExifToolProcess, Workspace
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
)
from ramcli.metadata.options import WriterOptions
from ramcli.metadata.plan import (
    CREATED_SIDECAR,
    CURRENT_IPTC_DIGEST,
    DESCRIPTION,
    DIGEST_BEFORE,
    IN_SYNC,
    IPTC_DIGEST,
    IPTC_KEYWORDS,
    KEYWORD_FIELDS,
    MANAGED_FIELDS,
    NO_DIGEST,
    SUBJECT,
    FieldChange,
    FilePlan,
    TargetPlan,
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

#: (photo, tags, caption, what discovery found it is (None: ask `what_is`)) in the writer
Item = tuple[str | os.PathLike, Sequence[TagScore], str | None, Sniffed | Found | None]
# Fields that every XMP file ExifTool writes carries: not content of the user's.
_BOILERPLATE = ("SourceFile", "XMP-x:XMPToolkit")


@dataclass
class Batch:
    """One chunk of a writer call, from layout (targets, ledger rows) through reading and planning."""

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


class Planner:
    """Lays out, reads and plans batches for a `MetadataWriter`; `exiftool` gives the reading process."""

    def __init__(self, options: WriterOptions, ledger: Ledger, workspaces: Path,
                 exiftool: Callable[[], ExifToolProcess]):
        self.options, self.ledger, self.workspaces, self.exiftool = options, ledger, workspaces, exiftool

    def layout(self, items: list[Item], untag: bool) -> Batch:
        """Plans with their targets, before anything is read (cheap: sniffing, directory listings)."""
        dirs = DirCache()
        # a photo named twice: the last item wins
        latest = {os.path.realpath(p): (list(tags), caption, kind) for p, tags, caption, kind in items}
        rows = self.ledger.entries_of(list(latest))
        plans: dict[str, FilePlan] = {}
        batch = Batch([], {}, rows, {}, Workspace(self.workspaces), untag)
        for path, (tags, caption, kind) in latest.items():
            plan = plans[path] = FilePlan(path)
            targets, plan.error = self._targets(Path(path), dirs, untag, {e.target for e in rows[path]}, kind)
            for target, wanted, extension, fmt in targets:
                key = str(target)
                if key in batch.wanted:  # two photos sharing one sidecar: first one keeps it
                    continue
                batch.wanted[key] = (path, wanted, tags, caption)
                batch.extensions[key] = extension
                if fmt:
                    batch.formats[key] = fmt
                plan.targets.append(TargetPlan(key, is_sidecar=target != Path(path), exists=target.exists()))
        batch.plans = [plans[os.path.realpath(p)] for p, *_ in items]
        return batch

    def _targets(
        self, photo: Path, dirs: DirCache, untag: bool, known: set[str], kind: Sniffed | Found | None
    ) -> tuple[list[tuple[Path, bool, str, str | None]], str | None]:
        """(target, wanted, extension, format) for a photo, or an error. Ledger targets come along
        unwanted, if they can belong to the photo at all. `kind`: discovery's verdict, if the caller
        has one."""
        known = {t for t in known if belongs_to(photo, t)}
        targets: list[tuple[Path, bool, str, str | None]] = []
        found = (kind or what_is(photo)) if photo.is_file() and (not untag or str(photo) in known) else None
        if not untag:
            if found is None:
                return [], "file not found" if not photo.exists() else "cannot read it"
            photo_kind = found.kind in PHOTO_KINDS
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

    def read_and_plan(self, batch: Batch) -> list[FilePlan]:
        """One ExifTool read for every existing target of the chunk, then the diff per target."""
        unique = {p.path: p for p in batch.plans}.values()  # a repeated photo is planned once
        readable = [t.target for p in unique for t in p.targets if t.exists]
        current_all, messages = self.read(batch, readable)
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

    def read(self, batch: Batch, targets: list[str]) -> tuple[dict[str, dict], dict[str, list[str]]]:
        """`ExifToolProcess.read` of targets, through the batch's workspace, keyed by target."""
        found, messages = self.exiftool().read([batch.source(t) for t in targets])
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


def _ramcli_tag(entry: LedgerEntry | None) -> bool:
    """Whether a ledger row says its value is one of ramcli's tags (not the user's, not a seed)."""
    return entry is not None and not entry.preexisting and not entry.seeded



def as_items(
    items: Sequence[tuple[str | os.PathLike, Sequence[TagScore]]], captions: Sequence[str | None] | None,
    kinds: Sequence[Sniffed | Found | None] | None,
) -> list[Item]:
    for name, aligned in (("captions", captions), ("kinds", kinds)):
        if aligned is not None and len(aligned) != len(items):
            raise ValueError(f"{len(aligned)} {name} for {len(items)} photos: pass one per photo (None for none)")
    captions = [clean_caption(c) for c in captions] if captions is not None else [None] * len(items)
    kinds = kinds if kinds is not None else [None] * len(items)
    return [(p, tags, c, k) for (p, tags), c, k in zip(items, captions, kinds)]
