"""`ramcli watch`: photos are tagged as they arrive, by a process that keeps the model loaded.

The flow, one way as everywhere else:

    OS events (watchfiles, on a thread; it blocks in Rust between events)
      -> `Settler` (settler.py): each file waits until its size and mtime have stayed the same
         for `settle` seconds (a copy in progress, a camera import); sync clients' temporary
         names are ignored (watch_names.py)
      -> a pass over the settled files through `TagSession.run_pass`, as `ramcli tag` does: its
         incremental rule, its moved-photo rule (image-data hash), its sinks and its listener
      -> deleted paths (deletions.py): their photos leave the index once the additions of the
         same moment were matched, since a move is reported as a deletion plus an addition.

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
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path

from ramcli.errors import RamcliError, UsageError
from ramcli.media.discover import PHOTO_KINDS, Found, discover, walk_reaches
from ramcli.pathnames import display, from_text, to_text
from ramcli.tagging.deletions import Deletions, is_deleted, mount_points_under
from ramcli.tagging.listener import Listener, Summary
from ramcli.tagging.options import TagOptions
from ramcli.tagging.settler import Settler
from ramcli.tagging.watch_names import is_temporary, undecodable_path

#: watchfiles' step (ms): how often its Rust loop looks for collected events. 100 ms adds
#: at most that to the latency and keeps an idle watcher's wake-ups at 10 a second.
STEP_MS = 100
#: Longest a stream of events is collected before it is handed over (ms), so a burst of copies
#: starts to settle while the copying goes on.
DEBOUNCE_MS = 1000
#: How often (s) the folders are looked at when a folder name that is not UTF-8 leaves the OS's
#: change reports unusable (see `Watcher._watch`) and no --poll was given.
FALLBACK_POLL_S = 2.0


@dataclass(frozen=True)
class _Rescan:
    """watchfiles failed on the name that is not UTF-8 `path`, dropping the events collected with
    it: look at its folder again. `polling` is set when the watch fell back to polling for it."""

    path: str
    polling: bool = False


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


class Watcher:
    """`ramcli watch` over `options.paths` (folders) with their model, sinks and filters,
    reporting to `listener`."""

    def __init__(self, options: TagOptions, listener: Listener | None = None, settle: float = 1.0,
                 poll: float | None = None):
        if not options.use_index:
            raise UsageError("watch keeps its state in the index: it cannot run without one")
        if options.output is not None and options.fmt != "jsonl":
            raise UsageError("watch appends each group of results to --output: use --format jsonl with it")
        roots = []
        for p in options.paths:
            if not p.is_dir():
                raise UsageError(f"watch needs folders; not a folder: {p}")
            roots.append(Path(os.path.realpath(p)))
        self.options, self.listener, self.roots, self.poll = options, listener or Listener(), roots, poll
        self._listings: dict[str, dict[str, tuple]] = {}  # folders looked at again, as they were
        self.mount_points: set[str] = set()  # drives' folders under the roots, seen now or before
        self.settler = Settler(settle)
        self.stopping = threading.Event()
        self._events: queue.Queue = queue.Queue()
        self._error: BaseException | None = None

    def stop(self) -> None:
        """End after the batch in flight (what Ctrl-C and SIGTERM do)."""
        self.stopping.set()

    # ------------------------------------------------------------------ main loop
    def serve(self, once: bool = False) -> int:
        """Catch up, then (unless `once`) tag what arrives until stopped. Returns the number of
        photos that failed in the catch-up pass (the exit code of `--once` follows it)."""
        from ramcli.tagging.session import TagSession

        restore = self._handle_signals()
        thread = None
        try:
            with TagSession(self.options, self.listener, stop=self.stopping.is_set) as session:
                self.session = session
                self.mount_points = MountPoints(session.index).remember(self.roots)
                self.deletions = Deletions(session.index, self.mount_points)
                if not once:  # events of the catch-up time are queued, not lost
                    notify = self._open_watch()
                    thread = threading.Thread(target=self._watch, args=(notify,), name="ramcli-watch", daemon=True)
                    thread.start()
                failed = session.execute()
                if not self.stopping.is_set():
                    self._catch_up_deletions()
                if once or self.stopping.is_set():
                    return failed
                session.load()  # now, not when the first photo arrives
                self.listener.note(f"watching {', '.join(str(r) for r in self.roots)} (settle "
                                   f"{self.settler.settle:g} s); Ctrl-C or SIGTERM stops after the batch in flight")
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
                for found in discover([Path(path)], follow_links=self.options.follow_links):
                    if walk_reaches(root, found.path, self.options.include, self.options.exclude):
                        self.settler.touch(str(found.path))
                for record in self.session.index.iter_photos(under=Path(path)):
                    if is_deleted(record.path, self.mount_points):
                        self.settler.delete(record.path)
            elif os.path.lexists(path):
                if walk_reaches(root, Path(path), self.options.include, self.options.exclude):
                    self.settler.touch(path)
            else:
                self.settler.delete(path)

    def _rescan(self, rescan: _Rescan) -> None:
        """Look again at the folder of a path that watchfiles could not decode. Only what changed
        since the folder was last looked at this way is noted: the walk reads the files, and a
        read of the one with that name fails the watch again, which must not go round for ever."""
        if rescan.polling:
            self.listener.note(f"a folder name that is not UTF-8 ({display(rescan.path)}) stops the OS's change "
                               f"reports: looking for changes every {FALLBACK_POLL_S:g} s instead")
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
        return self.options.follow_links and self._root_of(real) is None and not holds_a_root

    def _classified(self, path: str) -> list[Found]:
        """The file at `path` as the walk of its folder finds it: one whose real place is outside
        the watched folders carries `link` (indexed; written only with --follow-links), and one
        inside a linked folder that the walk does not enter is left out."""
        found = list(discover([Path(path)]))
        if self._root_of(os.path.realpath(path)) is None:
            if not (os.path.islink(path) or self.options.follow_links):
                return []
            found = [replace(f, link=f.path) for f in found]
        return found

    # ------------------------------------------------------------------ one pass
    def _pass(self, files: list[str], deleted: list[str]) -> None:
        """Tag the settled files, re-point renamed ones, then forget the deleted ones."""
        start = time.monotonic()
        summary = Summary()
        found = [f for p in files for f in self._classified(p)]
        photos = [f for f in found if f.kind in PHOTO_KINDS]
        errors = [f for f in found if f.kind == "error"]
        summary.skipped = Counter(f.kind for f in found if f.kind not in PHOTO_KINDS and f.kind != "error")
        photos = self.deletions.renamed(photos, deleted, summary)
        self.session.run_pass(photos, errors, summary)
        if deleted:
            self.deletions.forget(deleted, summary)
        if (summary.tagged or summary.moved or summary.removed or summary.failed
                or summary.write_failed):  # not for its own writes coming back
            self.listener.reported(summary, time.monotonic() - start, self.options.write)

    def _catch_up_deletions(self) -> None:
        """After the catch-up pass: photos under the folders whose files were deleted while the
        watcher was not running (`is_deleted`: not those of a drive that is away)."""
        summary = Summary()
        self.deletions.forget([str(r) for r in self.roots], summary, sweep=True)
        if summary.removed:
            self.listener.note(f"removed {summary.removed} photo(s) whose files were deleted")

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
            self.listener.note("stopping after the batch in flight (Ctrl-C again to stop now)")

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
