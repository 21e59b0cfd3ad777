"""The context-manager protocol of ramcli's long-lived resources, written once."""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from typing import Self


class Closing(abc.ABC):
    """A resource that is its own context manager: `with Resource(...) as r:` hands back the
    resource and calls `close()` when the block ends, on an error too. A subclass writes
    `close` and nothing else."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @abc.abstractmethod
    def close(self) -> None:
        """Release what the resource holds (the end of a `with` block calls it)."""
