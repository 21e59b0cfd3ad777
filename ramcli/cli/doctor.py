"""`ramcli doctor`: what is installed, where state lives, what is missing."""

import typer


def register(app: typer.Typer) -> None:
    @app.command()
    def doctor() -> None:
        """Check torch/CUDA, ExifTool, models, vocabulary and index; say how to fix what is missing."""
