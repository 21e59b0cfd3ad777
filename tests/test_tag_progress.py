"""What a tagging run tells its listener: the progress bar's failures agree with the summary."""

from __future__ import annotations

import io
from pathlib import Path

from rich.console import Console

from images import photo_like
from ramcli.cli.progress import ConsoleListener, summary_lines
from ramcli.tagging.options import TagOptions
from ramcli.tagging.session import TagSession
from test_tag_cli import model_files  # noqa: F401 - the tiny model, a fixture


class Recording(ConsoleListener):
    """The terminal listener, keeping the counts it was given and the summary."""

    def __init__(self, err: Console):
        super().__init__(Console(file=io.StringIO()), err)
        self.events: list[tuple] = []

    def started(self, total: int, stage: str) -> None:
        self.events.append(("started", total))
        super().started(total, stage)

    def advanced(self, done: int, failures: int) -> None:
        self.events.append(("advanced", done, failures))
        super().advanced(done, failures)

    def ended(self) -> None:
        self.events.append(("ended",))
        super().ended()

    def reported(self, summary, elapsed: float, wrote: bool) -> None:
        self.summary = summary
        super().reported(summary, elapsed, wrote)


def _library(folder: Path) -> Path:
    folder.mkdir(parents=True)
    for i in range(3):
        photo_like(160, 120, seed=i).save(folder / f"p{i}.jpg", quality=85)
    (folder / "p0.jpg").chmod(0o444)  # its metadata write fails
    (folder / "broken.jpg").write_bytes(b"a photo's name, no photo inside")
    return folder


def test_the_bars_failures_are_the_summarys_failures_write_failures_included(model_files, tmp_path, monkeypatch):
    monkeypatch.setenv("RAMCLI_HOME", str(tmp_path / "home"))
    weights, labels = model_files
    lib = _library(tmp_path / "lib")
    terminal = io.StringIO()
    listener = Recording(Console(file=terminal, force_terminal=True, width=200))
    options = TagOptions(paths=[lib], weights=str(weights), labels=labels, precision="fp32", batch_size=1,
                         workers=0, threshold=0.0, fmt="jsonl", output=tmp_path / "out.jsonl")
    with TagSession(options, listener) as session:
        assert session.execute() == 2  # the broken file and the read-only photo: both new
    summary = listener.summary
    assert [path for path, _ in summary.write_failed] == [str(lib / "p0.jpg")]
    assert [path for path, _ in summary.failed] == [str(lib / "broken.jpg")]
    assert summary.tagged == 3 and summary.failures == 2
    assert listener.events[0] == ("started", 3) and listener.events[-1] == ("ended",)
    assert listener.events[-2][2] == summary.failures  # the bar's last count
    assert sum(done for _, done, _ in listener.events[1:-1]) == 3
    assert "3/3" in terminal.getvalue() and f"{summary.failures} failed" in terminal.getvalue()
    line = summary_lines(summary, 1.0, wrote=True)[0]
    assert "failed 1," in line and "metadata write failed 1" in line  # the same two, by kind
