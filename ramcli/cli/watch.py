"""`ramcli watch`: tag new and changed photos as they arrive (a thin layer over ramcli.tagging.watch)."""

from __future__ import annotations

from pathlib import Path

import typer

from ramcli.cli.common import console, err_console
from ramcli.cli.tag import check_ready, tag_options


def register(app: typer.Typer) -> None:
    @app.command()
    @tag_options(omit=("dry_run", "force", "no_index"))
    def watch(
        paths: list[Path] = typer.Argument(..., help="Folders to watch (recursively)."),
        settle: float = typer.Option(1.0, "--settle", min=0.0, help="Seconds a file's size and modification time must stay the same before it is tagged (raise it for slow network copies)."),
        once: bool = typer.Option(False, "--once", help="Catch up with what changed since the last run, then exit (for cron)."),
        poll: float = typer.Option(None, "--poll", min=0.1, metavar="SECONDS", help="Look for changes every SECONDS instead of waiting for OS events: for network shares (NFS, SMB) whose changes the OS does not report."),
        *,
        options,
    ) -> None:
        """Watch folders and tag new and changed photos as they arrive, with the model kept loaded.

        Starts with a catch-up pass (exactly `ramcli tag` over the folders). Files still being written are tagged once complete; moved and renamed photos are re-pointed in the index without re-tagging; deleted ones leave it. Ctrl-C or SIGTERM stops after the batch in flight.
        """
        from ramcli.cli.progress import ConsoleListener
        from ramcli.tagging.watch import Watcher

        watcher = Watcher(options, ConsoleListener(console, err_console, quiet=options.quiet), settle=settle, poll=poll)
        check_ready(options)
        failed = watcher.serve(once=once)
        if failed:
            raise typer.Exit(1)
