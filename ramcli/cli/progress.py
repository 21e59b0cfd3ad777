"""How a tagging run looks on the terminal: the `Listener` of `ramcli tag` and `ramcli watch`.

The progress bar (on a terminal only) and every line about the run go to stderr, so stdout
holds only results. --quiet keeps notes, the bar and the summary away; warnings (a download,
tags a model cannot score) are shown anyway.
"""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from ramcli.media.discover import Found, describe_skipped
from ramcli.pathnames import display
from ramcli.tagging.listener import Listener, Summary


class ConsoleListener(Listener):
    """Rich's progress bar and the summary lines. `console` takes a dry run's list of photos."""

    def __init__(self, console: Console, err: Console, quiet: bool = False):
        self.console, self.err, self.quiet = console, err, quiet
        self.progress: Progress | None = None
        self.done = self.failures = 0

    def note(self, text: str) -> None:
        if not self.quiet:
            self.err.print(text, markup=False, highlight=False, soft_wrap=True)

    def warning(self, text: str) -> None:
        self.err.print(text, markup=False, highlight=False, soft_wrap=True)

    def started(self, total: int, stage: str) -> None:
        self.done = self.failures = 0
        self.since = time.monotonic()
        self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[rate]:.1f} img/s"), TextColumn("{task.fields[failed]} failed"),
                                 TimeRemainingColumn(), console=self.err, disable=self.quiet or not self.err.is_terminal)
        self.progress.start()
        self.task = self.progress.add_task(stage, total=total, rate=0.0, failed=0)

    def stage(self, name: str) -> None:
        if self.progress is not None:
            self.progress.update(self.task, description=name)

    def advanced(self, done: int, failures: int) -> None:
        self.done += done
        self.failures = failures
        if self.progress is not None:
            rate = self.done / max(time.monotonic() - self.since, 1e-6)
            self.progress.update(self.task, advance=done, failed=failures, rate=rate)

    def ended(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def reported(self, summary: Summary, elapsed: float, wrote: bool) -> None:
        if not self.quiet:
            for line in summary_lines(summary, elapsed, wrote):
                self.err.print(line, markup=False, highlight=False, soft_wrap=True)

    def planned(self, due: list[Found], summary: Summary, broken: list[Found]) -> None:
        for f in due:
            self.console.print(display(f.path), markup=False, highlight=False, soft_wrap=True)
        if not self.quiet:
            more = f"; {len(broken)} broken" if broken else ""
            self.err.print(f"would tag {len(due)} photo(s); {summary.unchanged} unchanged; "
                           f"{describe_skipped(summary.skipped) or 'nothing skipped'}{more}")
            for f in broken:
                self.err.print(f"  broken: {display(f.path)}: {f.reason}", markup=False, highlight=False,
                               soft_wrap=True)


def summary_lines(s: Summary, elapsed: float, wrote: bool) -> list[str]:
    """The summary of a run: one line of counts, then what needs the user's eye, by path.
    `wrote`: metadata writing was on (else the written count is left out)."""
    parts = [f"tagged {s.tagged}" + (f" ({s.rescored} from cached embeddings)" if s.rescored else ""),
             f"unchanged {s.unchanged}"]
    if s.moved:
        parts.append(f"moved {s.moved}")
    if s.removed:
        parts.append(f"removed {s.removed}")
    if wrote:
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
    lines = [", ".join(parts) + f" in {elapsed:.1f} s ({rate:.2f} img/s)"]
    if s.broken_skipped:
        lines.append(f"{s.broken_skipped} broken photo(s) skipped, unchanged since they failed "
                     "(`ramcli stats` lists them; --retry-broken tries them again)")
    if s.precision:
        lines.append(f"precision: {s.precision}")
    for label, rows in (("failed", s.failed), ("failed as before", s.known_failed),
                        ("not written", s.write_failed + s.still_unwritten + s.not_written),
                        ("not followed", s.not_followed)):
        lines += [f"  {label}: {display(path)}: {reason}" for path, reason in rows]
    return lines
