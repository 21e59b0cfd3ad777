"""Errors a user can act on.

Every failure that is the user's input or environment (a missing file, a bad checkpoint,
no ExifTool) is raised as a `RamcliError`. The CLI prints its message on one line and exits
with its `exit_code`; nothing else is allowed to reach the user as a traceback.
"""


class RamcliError(Exception):
    """A failure with a one-line, actionable message."""

    exit_code = 1

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class UsageError(RamcliError):
    """Bad arguments: exit code 2, like Typer/Click usage errors."""

    exit_code = 2


class CheckpointError(RamcliError):
    """A weights file that cannot be loaded safely or does not fit the architecture."""

