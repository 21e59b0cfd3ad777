"""What a run tells the one who watches it: the tally (`Summary`) and the events (`Listener`).

The core only reports; how a report looks (a Rich progress bar, a summary line, nothing at all
with --quiet) is decided at the command line's edge (`ramcli/cli/progress.py`). A `Listener`
as it is ignores everything, which is what a library caller or a benchmark wants.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from ramcli.media.discover import Found


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

    @property
    def failures(self) -> int:
        """Every photo this run tried and left failed: not tagged or not written, new or as
        before. The progress bar's count and the summary's failure figures both add up to it
        (broken photos not tried are counted apart, in `broken_skipped`)."""
        return len(self.failed) + len(self.known_failed) + len(self.write_failed) + len(self.still_unwritten)


class Listener:
    """The events of a session, in the order they come: `note`s and `warning`s at any time;
    per job `started`, `stage` changes, `advanced` after each batch, `ended`; `reported` with
    the summary of a whole run (or of a `ramcli watch` pass that did something); `planned`
    instead of all that for a dry run. Every method does nothing here: override what you show."""

    def note(self, text: str) -> None:
        """Something worth knowing that is no problem (what auto's precision check measured)."""

    def warning(self, text: str) -> None:
        """Something the user must see even with --quiet (a download, a tag that cannot be scored)."""

    def started(self, total: int, stage: str) -> None:
        """The model is about to see `total` photos; `stage` says what it does first."""

    def stage(self, name: str) -> None:
        """The model's work changed ("checking precision", then "tagging")."""

    def advanced(self, done: int, failures: int) -> None:
        """A batch of `done` photos went through every sink; `failures`: `Summary.failures` now."""

    def ended(self) -> None:
        """The job is over (done, or stopped after the batch in flight)."""

    def reported(self, summary: Summary, elapsed: float, wrote: bool) -> None:
        """The run is over; `wrote`: metadata writing was on."""

    def planned(self, due: list[Found], summary: Summary, broken: list[Found]) -> None:
        """A dry run's answer: the photos that would be tagged, the tally of the others and the
        files found broken."""
