"""Inference never imports the training package: `ramcli_train` loads only for training commands.

Each command runs in a fresh interpreter, because this test process has long imported everything.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from ckpt_factory import make_labels_dir, make_official_checkpoint
from images import photo_like

REPO = Path(__file__).resolve().parents[1]

#: Runs the real entry point, then reports the exit code and every ramcli_train module loaded.
DRIVER = """
import json, sys
from ramcli.cli.app import main
try:
    main(sys.argv[1:])
    code = 0
except SystemExit as exc:
    code = exc.code or 0
loaded = sorted(m for m in sys.modules if m.split(".")[0] == "ramcli_train")
print("IMPORTS " + json.dumps({"code": code, "ramcli_train": loaded}), file=sys.stderr)
"""


def _run(*args: str, home: Path) -> dict:
    env = {**os.environ, "RAMCLI_HOME": str(home), "PYTHONPATH": os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    done = subprocess.run([sys.executable, "-c", DRIVER, *args], capture_output=True, text=True, env=env, timeout=600)
    line = next((l for l in done.stderr.splitlines() if l.startswith("IMPORTS ")), None)
    assert line is not None, done.stderr
    return json.loads(line.removeprefix("IMPORTS ")) | {"stdout": done.stdout, "stderr": done.stderr}


@pytest.mark.slow
def test_inference_commands_never_import_ramcli_train(tmp_path):
    home = tmp_path / "home"
    for args in (["tag", "--help"], ["eval", "--help"], ["search", "--help"], ["vocab", "list", "--help"]):
        result = _run(*args, home=home)
        assert result["code"] == 0 and result["ramcli_train"] == [], (args, result)

    weights = make_official_checkpoint(tmp_path / "tag2text_tiny.pth", "tag2text_tiny_bert_vocab", num_classes=20)
    labels = make_labels_dir(tmp_path, 20, "tag2text")
    library = tmp_path / "lib"
    library.mkdir()
    for i in range(2):
        photo_like(96, 64, seed=i).save(library / f"p{i}.jpg", quality=85)
    tagged = _run("tag", str(library), "--weights", str(weights), "--labels", str(labels), "--caption",
                  "--threshold", "0", "--no-write", "--workers", "0", "-q", "-f", "jsonl", home=home)
    assert tagged["code"] == 0 and tagged["ramcli_train"] == [], tagged
    rows = [json.loads(line) for line in tagged["stdout"].splitlines()]
    assert len(rows) == 2 and all(isinstance(r["caption"], str) and r["tags"] for r in rows)

    found = _run("search", rows[0]["tags"][0]["name"], "--format", "paths", home=home)
    assert found["code"] == 0 and found["ramcli_train"] == [], found
    assert str(library / "p0.jpg") in found["stdout"].splitlines() or str(library / "p1.jpg") in found["stdout"]

    # the check itself can fail: a training-data command does load the package
    parsed = _run("parse", "a dog", "--labels", str(make_labels_dir(tmp_path, 20)), "--json", home=home)
    assert parsed["code"] == 0 and "ramcli_train.parse" in parsed["ramcli_train"], parsed
