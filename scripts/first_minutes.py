"""A new user's first ten minutes, walked through with an installed ramcli: each step runs the
command a newcomer would type and checks what they would see. Prints one line a check and exits
1 if any fails.

The numbers are those of the ten findings the walk answers; 4 (what set-up installs) is
answered by the venv it runs in, which `scripts/setup.sh --bare` made.

Run by scripts/smoke.sh in the venv a bare `pip install .` made (no extras), from a scratch
folder holding copies of the test checkpoint factory, so it shows what a user of the package
gets, not the source tree. Usage: python first_minutes.py PATH/TO/ramcli
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from ckpt_factory import make_labels_dir, make_official_checkpoint
from PIL import Image

RAMCLI = sys.argv[1] if len(sys.argv) > 1 else "ramcli"
WORK = Path.cwd()
FAILED: list[str] = []


def run(
    *args: str, env: dict | None = None, cwd: Path = WORK
) -> subprocess.CompletedProcess:
    full = {
        **os.environ,
        "RAMCLI_HOME": str(WORK / "home"),
        "NO_COLOR": "1",
        **(env or {}),
    }
    return subprocess.run(
        [RAMCLI, *args],
        check=False,
        capture_output=True,
        text=True,
        env=full,
        cwd=cwd,
        timeout=600,
    )


def check(item: str, what: str, ok: bool, seen: str = "") -> None:
    print(
        f"{'ok  ' if ok else 'FAIL'} {item:>2}. {what}"
        + ("" if ok else f"\n        saw: {seen[:300]!r}")
    )
    if not ok:
        FAILED.append(f"{item}. {what}")


def one_error_line(done: subprocess.CompletedProcess) -> bool:
    lines = done.stderr.strip().splitlines()
    return (
        len(lines) == 1
        and lines[0].startswith("error: ")
        and "Traceback" not in done.stderr
    )


def _timed(*argv: str) -> float:
    start = time.perf_counter()
    subprocess.run(argv, check=False, capture_output=True, timeout=60)
    return time.perf_counter() - start


def best_of(n: int, *args: str) -> float:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        run(*args)
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    photos = WORK / "photos"
    photos.mkdir()
    for i, colour in enumerate([(200, 120, 40), (30, 90, 200), (40, 160, 60)]):
        Image.new("RGB", (160, 120), colour).save(photos / f"img{i}.jpg", quality=90)
    weights = make_official_checkpoint(
        WORK / "ram_tiny.pth", "ram_tiny", num_classes=30
    )
    labels = make_labels_dir(WORK, 30)

    # 1. a bare install runs every command (smoke.py ran each --help in this venv)
    done = run("--help")
    check(
        "1",
        "`ramcli --help` works in a venv without extras",
        done.returncode == 0 and "tag" in done.stdout,
        done.stderr,
    )

    # 2. start-up: ramcli's own cost, beside the interpreter's start in the same run (a busy machine
    # slows both)
    python = min(_timed(sys.executable, "-c", "pass") for _ in range(3))
    for args in (("--help",), ("tag", "--format", "yaml", "photos")):
        seconds = best_of(5, *args)
        check(
            "2",
            f"`ramcli {' '.join(args)}` answers in {seconds:.2f} s (Python alone: {python:.2f} s)",
            seconds - python < 0.4,
        )

    # 3. first run offline: one line naming --weights, nothing created
    done = run("tag", "photos", env={"HF_HUB_OFFLINE": "1"})
    check(
        "3",
        "offline first run: exit 1, one error line naming --weights",
        done.returncode == 1 and one_error_line(done) and "--weights" in done.stderr,
        done.stderr,
    )
    check(
        "3",
        "offline first run creates no index",
        not (WORK / "home" / "index.db").exists(),
    )
    done = run("models", "pull", "clip-vit-b-16", env={"HF_HUB_OFFLINE": "1"})
    check(
        "3",
        "CLIP advice names --clip-weights, not `models import`",
        done.returncode != 0
        and "--clip-weights" in done.stderr
        and "models import" not in done.stderr,
        done.stderr,
    )

    # 5. doctor tells the truth
    blocker = WORK / "a-file"
    blocker.write_text("")
    done = run("doctor", env={"RAMCLI_HOME": str(blocker / "home")})
    check(
        "5",
        "doctor: an unusable RAMCLI_HOME is reported and exits 1",
        done.returncode == 1
        and re.search(r"home\s*│?\s*(?!ok)\w+", done.stdout) is not None,
        done.stdout,
    )
    done = run("doctor", env={"HF_HUB_OFFLINE": "1"})
    check(
        "5",
        "doctor: no model and no hub exits 1 and names --weights",
        done.returncode == 1 and "--weights" in done.stdout,
        done.stdout,
    )

    # 6. usage errors early, with exit 2
    start = time.perf_counter()
    done = run("tag", "--weights", str(weights), "--format", "yaml", "photos")
    check(
        "6",
        f"`tag --format yaml` is a usage error before the model loads ({time.perf_counter() - start:.2f} s)",
        done.returncode == 2 and one_error_line(done),
        done.stderr,
    )
    for args, what, seen in (
        (("--weights", "nope.pth"), "a missing --weights file exits 2", "error: "),
        (("--weights", "ram_swin_larg_14m"), "a misspelt model name gets a did-you-mean", "ram_swin_large_14m"),
    ):
        done = run("tag", *args, "photos")
        check("6", what, done.returncode == 2 and one_error_line(done) and seen in done.stderr, done.stderr)
    bare_path = os.pathsep.join(
        p
        for p in os.environ["PATH"].split(os.pathsep)
        if not (Path(p) / "exiftool").exists()
    )
    done = run("tag", "--weights", str(weights), "photos", env={"PATH": bare_path})
    check(
        "6",
        "missing ExifTool is said before the model loads, exit 1",
        done.returncode == 1
        and done.stderr.startswith("error: ExifTool not found")
        and one_error_line(done),
        done.stderr,
    )

    # the user's first real run
    done = run(
        "tag",
        "--weights",
        str(weights),
        "--labels",
        str(labels),
        "--threshold",
        "0",
        "--top-k",
        "3",
        "photos",
    )
    check(
        "-",
        "tag a folder with a weights file the user has",
        done.returncode == 0,
        done.stderr,
    )
    first = json.loads(done.stdout.splitlines()[0])
    tag = first["tags"][0]["name"]

    # 7. search keeps its options; one piped default; show by name from anywhere
    done = run("search", "-h")
    check(
        "7",
        "`search -h` is help",
        done.returncode == 0 and "Usage: ramcli search" in done.stdout,
        done.stderr,
    )
    done = run("search", tag, "-f", "json")
    check(
        "7",
        "`search TAG -f json` is an option, not a tag",
        done.returncode == 0 and isinstance(json.loads(done.stdout), list),
        done.stdout + done.stderr,
    )
    done = run("search", tag)
    check(
        "7",
        "piped `search` prints JSON lines like piped `tag`",
        done.returncode == 0
        and done.stdout
        and all(json.loads(line)["path"] for line in done.stdout.splitlines()),
        done.stdout,
    )
    with_tag = {json.loads(line)["path"] for line in done.stdout.splitlines()}
    done = run("search", "--", f"-{tag}")
    without = {json.loads(line)["path"] for line in done.stdout.splitlines()}
    check(
        "7",
        "`search -- -TAG` finds exactly the other photos",
        done.returncode in (0, 1)
        and not with_tag & without
        and len(with_tag | without) == 3,
        done.stdout + done.stderr,
    )
    elsewhere = WORK / "elsewhere"
    elsewhere.mkdir()
    done = run("show", Path(first["path"]).name, cwd=elsewhere)
    check(
        "7",
        "`show NAME` from another folder finds the indexed photo",
        done.returncode == 0 and tag in done.stdout,
        done.stdout + done.stderr,
    )

    # 8. help
    for command in ("tag", "search", "show", "vocab add", "train"):
        out = run(*command.split(), "--help").stdout
        check(
            "8",
            f"`{command} --help` has examples and plain metavars",
            "Examples" in out and not re.search(r"<(bool|str|int|float)>|list\[", out),
            out,
        )
    out = run("tag", "--help").stdout
    check(
        "8",
        "--device, --precision, --format list their choices",
        all(
            re.search(pattern, out)
            for pattern in (r"auto\|cpu", r"auto\|fp32", r"table\|json")
        ),
        out,
    )
    done = run("-V")
    check(
        "8",
        "`ramcli -V` prints the version",
        done.returncode == 0 and done.stdout.startswith("ramcli "),
        done.stdout,
    )
    check(
        "8",
        "shell completion is offered",
        "--install-completion" in run("--help").stdout,
    )

    # 9. output
    done = run("show", first["path"], "--format", "table")
    check(
        "9",
        f"`show` names the photo once ({len(done.stdout.splitlines())} lines for 3 tags)",
        done.returncode == 0 and done.stdout.count(first["path"]) == 1,
        done.stdout,
    )
    done = run("show", first["path"], "--format", "json")
    check(
        "9",
        "`show --format json`",
        done.returncode == 0 and json.loads(done.stdout),
        done.stdout,
    )
    check(
        "9",
        "no Chinese column unless asked",
        not re.search(r"[\u4e00-\u9fff]", run("stats").stdout),
    )
    check(
        "9",
        "NO_COLOR: no escape sequences",
        "\x1b[" not in run("stats").stdout + run("--help").stdout,
    )
    (photos / "img0.jpg").touch()
    done = run("tag", "--weights", str(weights), "--labels", str(labels), "photos")
    check(
        "9",
        "the precision report is not repeated on the next run",
        "agree" not in done.stderr,
        done.stderr,
    )

    # 10. the README is for users (smoke.sh copies it here)
    readme = WORK / "README.md"
    if readme.exists():
        lines = readme.read_text().splitlines()
        install = next(
            (i for i, line in enumerate(lines) if line.startswith("## Install")),
            len(lines),
        )
        check(
            "10",
            f"README: {len(lines)} lines, install at line {install + 1}",
            len(lines) <= 200
            and install < 40
            and "load average" not in readme.read_text(),
        )

    print(
        f"first minutes: {len(FAILED)} of the checks failed"
        if FAILED
        else "first minutes: every check passed"
    )
    sys.exit(1 if FAILED else 0)


if __name__ == "__main__":
    main()
