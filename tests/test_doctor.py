"""`ramcli doctor` says what is true: a home ramcli cannot write, no model and no hub to fetch one."""

from __future__ import annotations

import re

from conftest import run_cli


def _flat(text: str) -> str:
    return re.sub(r"[\s│┃|]+", " ", text)


def _model(home):
    (home / "models").mkdir(parents=True)
    (home / "models" / "mine.safetensors").write_bytes(b"")


def test_unwritable_home_is_reported_and_fails(tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("RAMCLI_HOME", str(blocker / "home"))
    assert run_cli(["doctor"]) == 1
    out = _flat(capsys.readouterr().out)
    assert "home not writable" in out and "is not a folder" in out
    assert blocker.read_text() == "not a folder"


def test_no_model_and_no_hub_is_a_failure_that_names_weights_file(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RAMCLI_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens
    assert run_cli(["doctor"]) == 1
    out = _flat(capsys.readouterr().out)
    assert "models missing" in out and "cannot be reached" in out and "--weights FILE.pth" in out
    assert "models pull" not in out
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert run_cli(["doctor"]) == 1
    assert "HF_HUB_OFFLINE" in capsys.readouterr().out
    assert not (tmp_path / "home").exists()  # doctor changes nothing


def test_a_model_and_a_writable_home_pass(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RAMCLI_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _model(tmp_path / "home")
    assert run_cli(["doctor"]) == 0
    out = _flat(capsys.readouterr().out)
    assert "models ok mine.safetensors" in out and "home ok" in out
