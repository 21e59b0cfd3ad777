"""`ramcli models` and `ramcli doctor` as a user runs them."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from ckpt_factory import make_labels_dir, make_official_checkpoint
from ramcli.cli.app import app


def _flat(table: str) -> str:
    """A rich table's text without spaces, line breaks and column rules, for wrapped cells."""
    return "".join(line.strip("│ ┃") for line in table.splitlines()).replace(" ", "")


def test_convert_info_import_and_tag_by_name(tmp_path):
    ckpt = make_official_checkpoint(tmp_path / "tiny.pth", "ram_tiny", num_classes=20)
    labels = make_labels_dir(tmp_path, 20)
    env = {"RAMCLI_HOME": str(tmp_path / "home")}
    run = CliRunner().invoke
    res = run(app, ["models", "convert", str(ckpt), str(tmp_path / "t.safetensors"), "--labels", str(labels),
                    "--dtype", "fp16"], env=env)
    assert res.exit_code == 0, res.output
    info = json.loads(run(app, ["models", "info", str(tmp_path / "t.safetensors")], env=env).stdout)
    assert info["arch"] == "ram_tiny" and info["classes"] == 20 and info["dtype"] == "fp16"
    res = run(app, ["models", "import", str(ckpt), "--name", "mytiny", "--labels", str(labels)], env=env)
    assert res.exit_code == 0, res.output
    assert (tmp_path / "home" / "models" / "mytiny.safetensors").is_file()
    listed = run(app, ["models", "list", "-f", "tsv"], env=env)
    assert "ram_plus_swin_large_14m (default)\tram_plus_swin_large_384\t3.01 GB\t-" in listed.stdout
    photo = tmp_path / "p.jpg"
    from images import photo_like

    photo_like(96, 64).save(photo)
    res = run(app, ["tag", str(photo), "--weights", "mytiny", "-f", "jsonl", "--no-write", "--no-index",
                    "--workers", "0", "-q"], env=env)
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["model"].startswith("tiny@")


def test_pull_offline_is_one_clear_error(tmp_path):
    env = {"RAMCLI_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    res = CliRunner().invoke(app, ["models", "pull", "ram_swin_large_14m"], env=env)
    assert res.exit_code == 1
    assert "ramcli models import ram_swin_large_14m.pth" in str(res.exception)
    assert "--weights ram_swin_large_14m.pth" in str(res.exception)


def test_doctor_reports_exiftool_and_state(tmp_path):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "mine.safetensors").write_bytes(b"")
    res = CliRunner().invoke(app, ["doctor"], env={"RAMCLI_HOME": str(tmp_path)})
    assert res.exit_code == 0, res.output
    out = _flat(res.stdout)
    assert "ExifTool│ok│12." in out and f"{tmp_path}(RAMCLI_HOME)".replace(" ", "") in out
