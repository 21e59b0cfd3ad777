"""`ramcli watch`: photos are tagged as they arrive, by a process that keeps the model loaded.

The flow, one way as everywhere else:

    OS events (watchfiles, on a thread; it blocks in Rust between events)
      -> `Settler`: each file waits until its size and mtime have stayed the same for `settle`
         seconds (a copy in progress, a camera import); sync clients' temporary names are ignored
      -> a pass over the settled files through the `TagSession` that `ramcli tag` uses: its
         incremental rule, its moved-photo rule (image-data hash), its sinks and progress bar
      -> deleted paths: their photos leave the index once the additions of the same moment were
         matched, since a move is reported as a deletion plus an addition.

The OS's labels (added, modified, deleted) are only hints: what exists when a path is looked at
decides. A rename of a file or folder is recognised without running the model when the index
holds a vanished photo with the new file's size, mtime (a rename keeps both) and image data;
otherwise the moved-photo rule matches it by its image data. Metadata that ramcli itself
writes comes back as events too; the incremental rule sees the size and mtime the index
recorded after the write and tags nothing. A photo that is not there is forgotten only when it
was deleted (`is_deleted`), not when the drive that holds it is away.

On start a catch-up pass (exactly `ramcli tag` over the folders) tags what changed while the
watcher was not running, then photos deleted meanwhile leave the index; so a restart loses
nothing and re-tags nothing. Ctrl-C or SIGTERM ends the pass after the batch in flight, which
is written and recorded first.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import stat
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path

from rich.console import Console

from ramcli.media.discover import Found, discover, walk_reaches
from ramcli.errors import RamcliError, UsageError
from ramcli.library.index import PhotoRecord
from ramcli.pathnames import display, from_text, to_text
from ramcli.tagging.run import Summary, TagRun

#: Names that sync clients, browsers and editors give files they are still writing (the final
#: name appears by a rename once the file is complete). Names starting with "." are ignored too:
#: Syncthing's `.syncthing.NAME.tmp`, rsync's `.NAME.XXXXXX`, macOS's `._NAME`.
TEMP_SUFFIXES = (".part", ".partial", ".crdownload", ".download", ".opdownload", ".tmp", ".temp", ".!sync",
                 ".!qb", ".!ut", "~", "_exiftool_tmp")
TEMP_PREFIXES = (".", "~$")

#: watchfiles' step (ms): how often its Rust loop looks for collected events. 100 ms adds
#: at most that to the latency and keeps an idle watcher's wake-ups at 10 a second.
STEP_MS = 100
#: Longest a stream of events is collected before it is handed over (ms), so a burst of copies
#: starts to settle while the copying goes on.
DEBOUNCE_MS = 1000
#: How often (s) the folders are looked at when a folder name that is not UTF-8 leaves the OS's
#: change reports unusable (see `Watcher._watch`) and no --poll was given.
FALLBACK_POLL_S = 2.0


#: Rust's debug form of a path (watchfiles' error message): a byte that is not UTF-8 as `\xNN`,
#: a character that needs it as `\u{...}` or `\n`-like, anything else as itself.
_RUST_ESCAPE = re.compile(r"\\(x[0-9A-Fa-f]{2}|u\{[0-9A-Fa-f]{1,6}\}|.)", flags=re.DOTALL)
_RUST_SHORT = {"0": "\0", "t": "\t", "r": "\r", "n": "\n"}


def undecodable_path(message: str) -> str | None:
    """The path (surrogate-escaped, as the walk names it) that watchfiles could not decode, from
    its error message; None for any other error."""
    match = re.fullmatch(r'Unable to decode path "(.*)" to string', message, flags=re.DOTALL)
    if match is None:
        return None
    text, raw, pos = match.group(1), bytearray(), 0
    for m in _RUST_ESCAPE.finditer(text):
        code = m.group(1)
        raw += text[pos:m.start()].encode()
        if code[0] == "x" and len(code) == 3:
            raw.append(int(code[1:], 16))
        elif code[0] == "u" and len(code) > 1:
            raw += chr(int(code[2:-1], 16)).encode()
        else:
            raw += _RUST_SHORT.get(code, code).encode()
        pos = m.end()
    raw += text[pos:].encode()
    return os.fsdecode(bytes(raw))


def is_temporary(name: str) -> bool:
    """A file that another program is still writing under a name it will rename when done."""
    lower = name.lower()
    return lower.startswith(TEMP_PREFIXES) or lower.endswith(TEMP_SUFFIXES)


@dataclass(frozen=True)
class _Rescan:
    """watchfiles failed on the name that is not UTF-8 `path`, dropping the events collected with
    it: look at its folder again. `polling` is set when the watch fell back to polling for it."""

    path: str
    polling: bool = False


@dataclass
class _Pending:
    size: int
    mtime_ns: int
    since: float  # when this size and mtime were first seen (the settler's clock)


class Settler:
    """Files wait here until their size and mtime have not changed for `settle` seconds;
    deleted paths wait as long and for the files noted with them, so that the addition half of
    a move is handled first."""

    def __init__(self, settle: float, clock: Callable[[], float] = time.monotonic):
        self.settle, self.clock = settle, clock
        self.files: dict[str, _Pending] = {}
        self.deleted: dict[str, float] = {}

    def touch(self, path: str) -> None:
        """Something happened to the file `path`: it settles again from now, unless its size and
        mtime are still those it is waiting with (a look at it again is no change)."""
        self.deleted.pop(path, None)
        try:
            st = os.stat(path)
        except OSError:
            self.files.pop(path, None)
            return
        pending = self.files.get(path)
        if pending is None or (pending.size, pending.mtime_ns) != (st.st_size, st.st_mtime_ns):
            self.files[path] = _Pending(st.st_size, st.st_mtime_ns, self.clock())

    def delete(self, path: str) -> None:
        self.files.pop(path, None)
        self.deleted.setdefault(path, self.clock())

    def next_due(self) -> float | None:
        """When the next file or deletion may be ready (the settler's clock), None if none waits."""
        times = [p.since for p in self.files.values()] + list(self.deleted.values())
        return min(times) + self.settle if times else None

    def ready(self) -> tuple[list[str], list[str]]:
        """(files stable for `settle` seconds, deletions as old), both removed from the waiting."""
        now = self.clock()
        files = []
        for path, pending in list(self.files.items()):
            if now - pending.since < self.settle:
                continue
            try:
                st = os.stat(path)
            except OSError:
                del self.files[path]  # gone meanwhile: its deletion event follows
                continue
            if (st.st_size, st.st_mtime_ns) != (pending.size, pending.mtime_ns):
                self.files[path] = _Pending(st.st_size, st.st_mtime_ns, now)
                continue
            del self.files[path]
            files.append(path)
        # A deletion waits for the files that were waiting when it was due: the addition half
        # of a move is noted a moment after it. A file that keeps changing stops holding it up.
        held_until = min((p.since for p in self.files.values()), default=float("inf"))
        deleted = [p for p, since in self.deleted.items() if now - since >= self.settle and held_until > since + self.settle]
        for path in deleted:
            del self.deleted[path]
        return sorted(files), sorted(deleted)


def is_deleted(path: str, mount_points: Iterable[str] = (), reported: bool = False) -> bool:
    """Whether the photo at `path` was deleted, rather than being out of reach (a drive that is
    unplugged, a share that is down): only a deleted photo's records may be forgotten, or `untag`
    would take ramcli's keywords for the user's once the drive is back.

    Out of reach: the path cannot be looked at (an I/O or permission error), a folder that a
    drive was mounted on is missing, or the nearest folder on the way that still exists cannot
    be read or is empty (what a drive's folder looks like while the drive is away). `reported`:
    the OS reported this very file gone (a drive that goes away reports no files), so being
    not there is enough."""
    try:
        os.lstat(path)
        return False
    except (FileNotFoundError, NotADirectoryError):
        pass
    except OSError:
        return False
    if any(path.startswith(m.rstrip(os.sep) + os.sep) and not os.path.lexists(m) for m in mount_points):
        return False
    if reported:
        return True
    folder = os.path.dirname(path)
    while True:
        try:
            st = os.stat(folder)
            break
        except (FileNotFoundError, NotADirectoryError):
            if os.path.dirname(folder) == folder:
                return False
            folder = os.path.dirname(folder)
        except OSError:
            return False
    if not stat.S_ISDIR(st.st_mode):
        return True  # a folder replaced by a file
    try:
        with os.scandir(folder) as entries:
            return next(entries, None) is not None
    except OSError:
        return False


class MountPoints:
    """The folders under the watched folders that a drive or share is mounted on, kept in the
    index (table `watch_mount_points`): while it is away, such a folder may be missing as a whole,
    which must not read as its photos being deleted."""

    TABLE = "watch_mount_points"

    def __init__(self, index):
        self.index = index

    def remember(self, roots: Iterable[Path]) -> set[str]:
        """Those mounted now (noted for later) and those noted before."""
        db = self.index.db
        known = set()
        if db[self.TABLE].exists():
            known = {from_text(p) for (p,) in db.execute(f"SELECT path FROM {self.TABLE}")}
        now = {m for root in roots for m in mount_points_under(root)}
        if now - known and not self.index.readonly:
            with self.index.write():
                db.execute(f"CREATE TABLE IF NOT EXISTS {self.TABLE} (path TEXT PRIMARY KEY)")
                db.conn.executemany(f"INSERT OR IGNORE INTO {self.TABLE} (path) VALUES (?)",
                                    [(to_text(m),) for m in sorted(now - known)])
        return known | now


def mount_points_under(root: Path) -> set[str]:
    """Folders under `root` on another device than their parent (symlinks not followed)."""
    found = set()
    try:
        stack = [(str(root), os.stat(root).st_dev)]
    except OSError:
        return found
    while stack:
        folder, device = stack.pop()
        try:
            with os.scandir(folder) as it:
                entries = list(it)
        except OSError:
            continue
        for entry in entries:
            try:
                if not entry.is_dir(follow_symlinks=False):
                    continue
                dev = entry.stat(follow_symlinks=False).st_dev
            except OSError:
                continue
            if dev != device:
                found.add(entry.path)
            stack.append((entry.path, dev))
    return found


class Watcher:
    """`ramcli watch` over `run.paths` (folders) with `run`'s model, sinks and filters."""

    def __init__(self, run: TagRun, settle: float = 1.0, poll: float | None = None):
        if not run.use_index:
            raise UsageError("watch keeps its state in the index: it cannot run without one")
        if run.output is not None and run.fmt != "jsonl":
            raise UsageError("watch appends each group of results to --output: use --format jsonl with it")
        roots = []
        for p in run.paths:
            if not p.is_dir():
                raise UsageError(f"watch needs folders; not a folder: {p}")
            roots.append(Path(os.path.realpath(p)))
        self.run, self.roots, self.poll = run, roots, poll
        self._listings: dict[str, dict[str, tuple]] = {}  # folders looked at again, as they were
        self.mount_points: set[str] = set()  # drives' folders under the roots, seen now or before
        self.settler = Settler(settle)
        self.stopping = threading.Event()
        run.stop = self.stopping.is_set
        self._events: queue.Queue = queue.Queue()
        self._error: BaseException | None = None

    def stop(self) -> None:
        """End after the batch in flight (what Ctrl-C and SIGTERM do)."""
        self.stopping.set()

    # ------------------------------------------------------------------ main loop
    def serve(self, console: Console, err_console: Console, once: bool = False) -> int:
        """Catch up, then (unless `once`) tag what arrives until stopped. Returns the number of
        photos that failed in the catch-up pass (the exit code of `--once` follows it)."""
        self.err = err_console
        restore = self._handle_signals()
        thread = None
        try:
            with self.run.open_session(err_console) as session:
                self.session = session
                self.mount_points = MountPoints(session.index).remember(self.roots)
                if not once:  # events of the catch-up time are queued, not lost
                    notify = self._open_watch()
                    thread = threading.Thread(target=self._watch, args=(notify,), name="ramcli-watch", daemon=True)
                    thread.start()
                failed = self.run.execute(console, err_console, session)
                if not self.stopping.is_set():
                    self._catch_up_deletions()
                if once or self.stopping.is_set():
                    return failed
                session.load()  # now, not when the first photo arrives
                if not self.run.quiet:
                    err_console.print(f"watching {', '.join(str(r) for r in self.roots)} (settle "
                                      f"{self.settler.settle:g} s); Ctrl-C or SIGTERM stops after the "
                                      "batch in flight", markup=False, highlight=False, soft_wrap=True)
                self._loop()
                return 0
        finally:
            self.stopping.set()
            if thread is not None:
                thread.join(timeout=5)
            restore()

    def _loop(self) -> None:
        while not self.stopping.is_set():
            due = self.settler.next_due()
            try:
                changes = self._events.get(timeout=None if due is None else max(0.0, due - time.monotonic()))
            except queue.Empty:
                changes = set()
            if changes is None:
                break
            self._take(changes)
            while True:  # whatever else is queued
                try:
                    more = self._events.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self.stopping.set()
                    break
                self._take(more)
            if self.stopping.is_set():
                break
            files, deleted = self.settler.ready()
            if files or deleted:
                self._pass(files, deleted)
        if self._error is not None:
            raise RamcliError(f"watching {', '.join(map(str, self.roots))} failed: {self._error}")

    def _take(self, item: set[str] | _Rescan) -> None:
        if isinstance(item, _Rescan):
            self._rescan(item)
        else:
            self._note(item)

    def _open_watch(self):
        """The OS watches, in place on return (so nothing between them and the catch-up is
        missed): watchfiles' Rust backend, which its docs describe for direct use."""
        from watchfiles._rust_notify import RustNotify

        try:
            return RustNotify([str(r) for r in self.roots], False, self.poll is not None,
                              int((self.poll or 0) * 1000), True, True)
        except Exception as exc:  # noqa: BLE001 - inotify limits, vanished folders: one line
            raise RamcliError(f"cannot watch {', '.join(map(str, self.roots))}: {exc}"
                              + ("" if self.poll else " (on Linux, raise fs.inotify.max_user_watches; "
                                 "on a network share, use --poll)")) from None

    def _watch(self, notify) -> None:
        """The event thread: watchfiles blocks in Rust until something happens or `stopping` is set.

        watchfiles decodes the path of every OS event, reads included, before it drops the ones
        that change nothing, and stops for good at a path that is not UTF-8, dropping what it had
        collected with it. So the watch is opened anew and the folder is looked at again (see
        `_rescan`). A folder with such a name fails every new OS watch at once (setting it up
        opens the folder, an event); the watch then polls instead, which reports changes only."""
        from watchfiles._rust_notify import WatchfilesRustInternalError

        try:
            while not self.stopping.is_set():
                try:
                    raw = notify.watch(DEBOUNCE_MS, STEP_MS, 0, self.stopping)
                except WatchfilesRustInternalError as exc:
                    path = undecodable_path(str(exc))
                    if path is None:
                        raise
                    notify.close()
                    fall_back = self.poll is None and os.path.isdir(path) and not os.path.islink(path)
                    if fall_back:
                        self.poll = FALLBACK_POLL_S
                    notify = self._open_watch()
                    self._events.put(_Rescan(path, polling=fall_back))
                    continue
                if isinstance(raw, set):
                    changes = {path for _, path in raw if self._wanted(path)}
                    if changes:
                        self._events.put(changes)
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            self._error = exc
        finally:
            notify.close()
            self._events.put(None)

    def _wanted(self, path: str) -> bool:
        """Paths under a watched folder without a temporary or hidden name on the way."""
        root = self._root_of(path)
        return root is not None and not any(is_temporary(part) for part in Path(path).relative_to(root).parts)

    def _root_of(self, path: str) -> Path | None:
        best = None
        for root in self.roots:
            if path == str(root) or path.startswith(str(root).rstrip(os.sep) + os.sep):
                if best is None or len(str(root)) > len(str(best)):
                    best = root
        return best

    def _note(self, changes: Iterable[str]) -> None:
        """Events are hints: what is there now decides between an addition and a deletion."""
        for path in sorted(changes):
            root = self._root_of(path)
            if root is None:
                continue
            if os.path.isdir(path):  # created, moved in, or to be looked at again: every file in it
                if os.path.islink(path) and not self._follows(path):
                    continue
                for found in discover([Path(path)], follow_links=self.run.follow_links):
                    if walk_reaches(root, found.path, self.run.include, self.run.exclude):
                        self.settler.touch(str(found.path))
                for record in self.session.index.iter_photos(under=Path(path)):
                    if is_deleted(record.path, self.mount_points):
                        self.settler.delete(record.path)
            elif os.path.lexists(path):
                if walk_reaches(root, Path(path), self.run.include, self.run.exclude):
                    self.settler.touch(path)
            else:
                self.settler.delete(path)

    def _rescan(self, rescan: _Rescan) -> None:
        """Look again at the folder of a path that watchfiles could not decode. Only what changed
        since the folder was last looked at this way is noted: the walk reads the files, and a
        read of the one with that name fails the watch again, which must not go round for ever."""
        if rescan.polling and not self.run.quiet:
            self.err.print(f"a folder name that is not UTF-8 ({display(rescan.path)}) stops the OS's change "
                           f"reports: looking for changes every {FALLBACK_POLL_S:g} s instead",
                           markup=False, highlight=False, soft_wrap=True)
        folder = os.path.dirname(rescan.path)
        if self._root_of(folder) is None or not self._wanted(folder):
            return
        now = _listing(folder)
        before = self._listings.get(folder)
        self._listings[folder] = now
        if before is None:
            self._note({folder})
        else:
            self._note({os.path.join(folder, n) for n in before.keys() | now.keys() if before.get(n) != now.get(n)})

    def _follows(self, link: str) -> bool:
        """Whether a symlinked folder that appeared is walked, as the walk decides: never one
        inside the folders (watched already) or holding one; one outside with --follow-links."""
        real = os.path.realpath(link)
        base = real.rstrip(os.sep) + os.sep
        holds_a_root = any(str(r) == real or str(r).startswith(base) for r in self.roots)
        return self.run.follow_links and self._root_of(real) is None and not holds_a_root

    def _classified(self, path: str) -> list[Found]:
        """The file at `path` as the walk of its folder finds it: one whose real place is outside
        the watched folders carries `link` (indexed; written only with --follow-links), and one
        inside a linked folder that the walk does not enter is left out."""
        found = list(discover([Path(path)]))
        if self._root_of(os.path.realpath(path)) is None:
            if not (os.path.islink(path) or self.run.follow_links):
                return []
            found = [replace(f, link=f.path) for f in found]
        return found

    # ------------------------------------------------------------------ one pass
    def _pass(self, files: list[str], deleted: list[str]) -> None:
        """Tag the settled files, re-point renamed ones, then forget the deleted ones."""
        start = time.monotonic()
        summary = Summary()
        found = [f for p in files for f in self._classified(p)]
        photos = [f for f in found if f.kind in ("image", "raw")]
        errors = [f for f in found if f.kind == "error"]
        summary.skipped = Counter(f.kind for f in found if f.kind not in ("image", "raw", "error"))
        photos = self._renamed(photos, deleted, summary)
        self.session.run_pass(photos, errors, summary, start)
        if deleted:
            self._forget(deleted, summary)
        if not self.run.quiet and (summary.tagged or summary.moved or summary.removed or summary.failed
                                   or summary.write_failed):  # not for its own writes coming back
            self.run.print_summary(self.err, summary, start)

    def _vanished(self, paths: Iterable[str]) -> list[PhotoRecord]:
        """Index records at or under these paths whose files were deleted (`is_deleted`); a
        record at a path that the OS reported gone itself counts as deleted once it is not there."""
        index, out, seen = self.session.index, [], set()
        for path in paths:
            records = [(r, False) for r in index.iter_photos(under=Path(path))]
            if not os.path.lexists(path):
                records += [(r, True) for r in [index.lookup(path)] if r is not None]
            for r, reported in records:
                if r.path not in seen and is_deleted(r.path, self.mount_points, reported=reported):
                    seen.add(r.path)
                    out.append(r)
        return out

    def _renamed(self, photos: list[Found], deleted: list[str], summary: Summary) -> list[Found]:
        """Re-point photos that were renamed or moved with their folder: a vanished record with
        the new file's size and mtime (a rename keeps both) and the same image data (a card's
        burst holds different photos of one size and minute). Returns the photos left for the
        incremental rule."""
        index = self.session.index
        by_stat = defaultdict(list)
        for r in self._vanished(deleted):
            if r.status == "tagged" and r.content_hash:
                by_stat[(r.size, r.mtime_ns)].append(r)
        if not by_stat:
            return photos
        rest = []
        for f in photos:
            candidates = by_stat.get((f.size, f.mtime_ns), [])
            old = _same_image(f, candidates) if candidates and index.lookup(str(f.path)) is None else None
            if old is None:
                rest.append(f)
                continue
            index.move(old.path, str(f.path), f.size, f.mtime_ns)
            candidates.remove(old)
            summary.moved += 1
        return rest

    def _forget(self, deleted: list[str], summary: Summary, sweep: bool = False) -> None:
        """Drop the photos of deleted paths from the index. Their write-ledger rows stay while
        the file they describe exists (a RAW's sidecar outlives its photo) and go with it.

        The index and the ledger commit one after the other, so a watcher killed between the
        two leaves rows of photos the index has already forgotten; `sweep` (the catch-up pass)
        looks at every ledger row under the deleted paths, which finds those too."""
        from ramcli.library.ledger import Ledger

        gone = {r.path for r in self._vanished(deleted)}
        if gone:
            forgotten = self.session.index.prune(exists=lambda p: p not in gone or os.path.lexists(p))
            summary.removed += len(forgotten)
        photos = gone | {p for p in deleted if is_deleted(p, self.mount_points, reported=True)}
        photos |= {p[:-4] for p in photos if p.lower().endswith(".xmp")}  # a deleted IMG.CR2.xmp
        ledger = Ledger(self.session.index.db)
        rows = [e for entries in ledger.entries_of(sorted(photos)).values() for e in entries]
        if sweep:
            rows += [e for folder in deleted for e in ledger.entries_under(folder)]
        stale = [e for e in rows
                 if self.session.index.lookup(e.path) is None and is_deleted(e.target, self.mount_points)]
        ledger.forget(stale)

    def _catch_up_deletions(self) -> None:
        """After the catch-up pass: photos under the folders whose files were deleted while the
        watcher was not running (`is_deleted`: not those of a drive that is away)."""
        summary = Summary()
        self._forget([str(r) for r in self.roots], summary, sweep=True)
        if summary.removed and not self.run.quiet:
            self.err.print(f"removed {summary.removed} photo(s) whose files were deleted", highlight=False)

    # ------------------------------------------------------------------ signals
    def _handle_signals(self) -> Callable[[], None]:
        """Ctrl-C and SIGTERM: stop after the batch in flight; a second Ctrl-C stops at once.
        Only the main thread can take signals (tests run the watcher elsewhere and call stop)."""
        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        pid = os.getpid()

        def handler(signum, frame):
            if os.getpid() != pid:  # a forked decode worker: the main process decides
                return
            if self.stopping.is_set() and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self.stopping.set()
            if not self.run.quiet:
                self.err.print("stopping after the batch in flight (Ctrl-C again to stop now)", highlight=False)

        previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        return lambda: [signal.signal(s, h) for s, h in previous.items()]


def _listing(folder: str) -> dict[str, tuple]:
    """A folder's entries with what any change to one alters (read without opening them)."""
    out = {}
    try:
        with os.scandir(folder) as entries:
            for entry in entries:
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                out[entry.name] = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    except OSError:
        pass
    return out


def _same_image(found: Found, candidates: list[PhotoRecord]) -> PhotoRecord | None:
    """The record among `candidates` with the image data of `found` (the one of the same name
    first), or None."""
    from ramcli.media.decode import ImageError, content_hash

    try:
        digest = content_hash(found.path)
    except ImageError:
        return None
    same = sorted((r for r in candidates if r.content_hash == digest),
                  key=lambda r: os.path.basename(r.path) != found.path.name)
    return same[0] if same else None
