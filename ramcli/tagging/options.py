"""What one `ramcli tag` (or `ramcli watch`) was asked to do: the options, as plain data.

`cli/tag.py` builds a `TagOptions` from the command line; `TagSession` (`tagging/session.py`)
carries out the steps. Nothing here runs anything, so the options can be copied and changed
(`dataclasses.replace`) freely: `tagging/on_ray.py` gives the driver and the actors different
copies of one run's options.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ramcli.errors import UsageError
from ramcli.metadata import WriterOptions
from ramcli.tagging.precision import DEFAULT_CHECK_PHOTOS


@dataclass
class TagOptions:
    paths: list[Path]
    weights: str | None = None
    arch: str | None = None
    labels: Path | None = None
    device: str = "auto"
    precision: str = "auto"
    runtime: str = "auto"  # "openvino": the tagging graph on OpenVINO (converted once, cached)
    precision_check: int = DEFAULT_CHECK_PHOTOS  # photos auto scores both ways before picking a CPU fast path
    decode: str = "auto"  # where JPEGs are decoded: workers (Pillow) or the model's device
    batch_size: int | None = None
    workers: int | None = None
    compile_model: bool | None = None  # None: compile when the job is large enough to repay it
    threshold: float | None = None
    threshold_file: Path | None = None
    top_k: int | None = None
    lang: str = "en"
    exclude_tags: list[str] = field(default_factory=list)
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    fmt: str = "jsonl"
    output: Path | None = None
    dry_run: bool = False
    force: bool = False
    retry_broken: bool = False  # try broken photos again although their files did not change
    use_index: bool = True
    index_path: Path | None = None
    write: bool = True
    writer_options: WriterOptions | None = None
    cache_embeddings: bool = False
    caption: bool = False
    quiet: bool = False  # no progress bar, no summary, no notes (the listener's to honour)
    follow_links: bool = False  # walk and write through symlinks that leave the tagged folders

    def validate(self) -> None:
        """The combinations no run can carry out, as usage errors."""
        from ramcli.tagging import runtimes
        from ramcli.tagging.pipeline import RUNTIMES

        if self.write and not self.use_index:
            raise UsageError("--no-index needs --no-write: the index keeps the ledger that makes `untag` exact")
        if self.runtime not in RUNTIMES:
            raise UsageError(f"unknown runtime {self.runtime!r}; use one of {', '.join(RUNTIMES)}")
        openvino = self.runtime == "openvino" or str(self.weights or "").lower().endswith(".xml")
        if runtimes.runtimes_of(self.precision) == ["openvino"] and not openvino:
            raise UsageError(f"--precision {self.precision} is an OpenVINO path: add --runtime openvino")
