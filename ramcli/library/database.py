"""The index database file: connecting, one write transaction at a time, one-line errors.

Every table in the file shares these rules, the index's and those other modules keep there (the
write ledger, the watcher's mount points):

* One write transaction per batch (`BEGIN IMMEDIATE`), so a kill -9 at any moment leaves either
  the whole batch or none of it. WAL lets searches read while a `tag` run writes.
* Two writers never corrupt it: every write transaction starts as the writer
  (`write_transaction`); the second waits (and says so on stderr) until the first commits.
"""

from __future__ import annotations

import os
import sqlite3
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ramcli.errors import RamcliError

#: How long a writer waits for another process's transaction before giving up (seconds).
DEFAULT_BUSY_TIMEOUT = float(os.environ.get("RAMCLI_INDEX_TIMEOUT", "600"))
#: Waits shorter than this pass silently; longer ones print a message first.
_QUIET_WAIT_MS = 250


def connect(path: Path, *, readonly: bool, timeout: float) -> sqlite3.Connection:
    """A connection with explicit transactions (BEGIN IMMEDIATE per batch, never implicit),
    foreign keys on and, for a writer, WAL."""
    if readonly:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=timeout)
    else:
        conn = sqlite3.connect(path, timeout=timeout)
    conn.isolation_level = None
    conn.execute("PRAGMA foreign_keys = ON")
    conn.execute("PRAGMA cache_size = -65536")
    if not readonly:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
    return conn


def print_wait(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@contextmanager
def write_transaction(conn: sqlite3.Connection, on_wait: Callable[[str], None] | None = None) -> Iterator[None]:
    """One write transaction on an index database, for the index and for the tables other
    modules keep in it (the write ledger).

    It starts as the writer (`BEGIN IMMEDIATE`): a transaction that reads first and writes later
    would fail with "database is locked", without waiting, whenever another process committed
    in between (in WAL mode, SQLite cannot move a reader's snapshot forward). A wait for another
    process passes silently when short, else `on_wait` hears why (default: a line on stderr), and
    it lasts up to the connection's busy timeout; then a one-line `RamcliError` says that another
    process holds the index. Inside an open transaction it is a savepoint of that transaction.
    """
    if conn.in_transaction:
        name = f"ramcli_{os.urandom(8).hex()}"
        conn.execute(f"SAVEPOINT {name}")
        try:
            yield
        except BaseException:
            if conn.in_transaction:  # an error can end the whole transaction, savepoints included
                conn.execute(f"ROLLBACK TO SAVEPOINT {name}")
                conn.execute(f"RELEASE SAVEPOINT {name}")
            raise
        conn.execute(f"RELEASE SAVEPOINT {name}")
        return
    _begin_immediate(conn, on_wait or print_wait)
    try:
        yield
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    try:
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def _begin_immediate(conn: sqlite3.Connection, on_wait: Callable[[str], None]) -> None:
    """`BEGIN IMMEDIATE`, waiting for another writer: quietly at first, then with a message."""
    timeout_ms = conn.execute("PRAGMA busy_timeout").fetchone()[0]
    path = next((file for _, name, file in conn.execute("PRAGMA database_list") if name == "main"), "") or "in memory"
    conn.execute(f"PRAGMA busy_timeout = {min(_QUIET_WAIT_MS, timeout_ms)}")
    try:
        try:
            conn.execute("BEGIN IMMEDIATE")
            return
        except sqlite3.OperationalError as exc:
            if not _is_locked(exc):
                raise
            if timeout_ms <= _QUIET_WAIT_MS:
                raise _held(path, timeout_ms / 1000) from exc
        on_wait(f"the index {path} is busy (another ramcli process is writing); waiting up to {timeout_ms / 1000:.0f} s...")
        conn.execute(f"PRAGMA busy_timeout = {timeout_ms}")
        started = time.monotonic()
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            if _is_locked(exc):
                raise _held(path, time.monotonic() - started) from exc
            raise
    finally:
        conn.execute(f"PRAGMA busy_timeout = {timeout_ms}")


def _held(path: str, waited: float) -> RamcliError:
    return RamcliError(f"the index {path} stayed locked by another process for {waited:.0f} s; "
                       "try again when it has finished")


def _is_locked(exc: sqlite3.OperationalError) -> bool:
    return "locked" in str(exc) or "busy" in str(exc)


def database_error(path: Path, exc: sqlite3.DatabaseError) -> RamcliError:
    """A one-line, actionable message for a database that cannot be opened."""
    if isinstance(exc, sqlite3.OperationalError) and _is_locked(exc):
        return RamcliError(f"the index {path} is locked by another process; try again when it has finished")
    if "not a database" in str(exc) or "malformed" in str(exc):
        return RamcliError(
            f"the index {path} is damaged ({exc}); move it aside and run `ramcli tag` again to rebuild it"
        )
    return RamcliError(f"cannot open the index {path}: {exc}")
