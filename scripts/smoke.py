"""Smoke test of an installed ramcli (no extras): every command's --help, then tag a photo
with a tiny random-weight checkpoint, search for one of its tags and show it.

Run by scripts/smoke.sh from a scratch folder holding copies of the test checkpoint factory.
Usage: python smoke.py PATH/TO/ramcli
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import typer
from PIL import Image

from ckpt_factory import make_labels_dir, make_official_checkpoint
from ramcli.cli.app import app


def ramcli(*args: str, ok=(0,)) -> subprocess.CompletedProcess:
    done = subprocess.run([RAMCLI, *args], capture_output=True, text=True, timeout=600)
    if done.returncode not in ok:
        sys.exit(f"smoke: `ramcli {' '.join(args)}` exited {done.returncode}:\n{done.stderr}")
    return done


def commands(cmd, path=()):
    yield path
    for name, sub in getattr(cmd, "commands", {}).items():
        yield from commands(sub, (*path, name))


def main() -> None:
    helped = 0
    for path in commands(typer.main.get_command(app)):
        out = ramcli(*path, "--help").stdout
        assert "Usage: ramcli" in out, out
        helped += 1
    print(f"smoke: --help of {helped} commands")

    work = Path.cwd()
    weights = make_official_checkpoint(work / "ram_tiny.pth", "ram_tiny", num_classes=30)
    labels = make_labels_dir(work, 30)
    photos = work / "photos"
    photos.mkdir()
    Image.new("RGB", (160, 120), (200, 120, 40)).save(photos / "orange.jpg", quality=90)
    write = [] if shutil.which("exiftool") else ["--no-write"]
    out = ramcli("tag", "--weights", str(weights), "--labels", str(labels), "--threshold", "0", "--top-k", "3",
                 *write, str(photos)).stdout
    record = json.loads(out.splitlines()[0])
    assert record["path"] == str(photos / "orange.jpg") and record["tags"], record
    tag = record["tags"][0]["name"]
    hits = [json.loads(line) for line in ramcli("search", f'"{tag}"').stdout.splitlines()]
    assert [h["path"] for h in hits] == [record["path"]], hits
    assert tag in ramcli("show", str(photos / "orange.jpg")).stdout
    ramcli("vocab", "list", "--custom")
    ramcli("doctor", ok=(0, 1))
    print(f"smoke: tagged {record['path']} ({tag}, ...), found it with search, showed it")


if __name__ == "__main__":
    RAMCLI = sys.argv[1]
    main()
