"""Ctrl-C: one line saying how to go on, exit 130, no warning from a library, and the re-run
finishes the job."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ckpt_factory import make_labels_dir, make_official_checkpoint
from images import photo_like

REPO = Path(__file__).resolve().parents[1]


def _tagged(db: Path) -> int:
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as con:
            return con.execute("SELECT count(*) FROM photos WHERE status = 'tagged'").fetchone()[0]
    except sqlite3.Error:
        return 0


def _as_a_shell_starts_a_job() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def _signal_state(pid: int) -> str:
    """The blocked, ignored and caught signal masks of a process, for a failure message."""
    lines = Path(f"/proc/{pid}/status").read_text().splitlines() if Path(f"/proc/{pid}/status").exists() else []
    return " ".join(line for line in lines if line.startswith(("SigBlk", "SigIgn", "SigCgt")))


@pytest.mark.slow
def test_ctrl_c_says_re_run_and_the_re_run_continues(tmp_path):
    weights = make_official_checkpoint(tmp_path / "ram_tiny.pth", "ram_tiny", num_classes=20)
    labels = make_labels_dir(tmp_path, 20)
    lib = tmp_path / "lib"
    lib.mkdir()
    for i in range(60):
        photo_like(320, 240, seed=i).save(lib / f"p{i:02d}.jpg", quality=85)
    home = tmp_path / "home"
    env = {**os.environ, "RAMCLI_HOME": str(home), "PYTHONPATH": str(REPO)}
    args = [sys.executable, "-m", "ramcli", "tag", str(lib), "--weights", str(weights), "--labels", str(labels),
            "--workers", "0", "--batch-size", "1", "--precision", "fp32", "-q", "-f", "jsonl"]
    # its own process group, as a shell runs a job: Ctrl-C reaches ramcli and ExifTool alike; and
    # SIGINT handled and unblocked, as an interactive shell starts a job, whatever this process
    # (pytest and the libraries earlier tests loaded) does with it
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=_as_a_shell_starts_a_job)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and _tagged(home / "index.db") < 3:
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()
    state = _signal_state(proc.pid)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, (err, state)
    lines = err.strip().splitlines()
    assert lines[-1].startswith("error: interrupted: re-run to continue"), err
    assert "Warning" not in err and "Traceback" not in err, err
    done = _tagged(home / "index.db")
    assert 3 <= done < 60
    rerun = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    assert len(rerun.stdout.splitlines()) == 60 - done and _tagged(home / "index.db") == 60


def test_a_failure_that_follows_ctrl_c_is_the_interrupt(monkeypatch, capsys):
    """ExifTool and the decode workers get the SIGINT too: what their death breaks (here a
    cleanup that finds ExifTool gone) may surface instead of the KeyboardInterrupt."""
    from ramcli.cli import app as cli

    def interrupted_then_broken(**_):
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)  # the KeyboardInterrupt comes first
        finally:
            raise RuntimeError("ExifTool instance not running: Cannot execute()")

    def broken(**_):
        raise RuntimeError("ExifTool instance not running: Cannot execute()")

    # SIGINT handled and unblocked, as an interactive shell starts ramcli, whatever the libraries
    # earlier tests loaded did to this process
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    blocked = signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    try:
        monkeypatch.setattr(cli, "app", interrupted_then_broken)
        with pytest.raises(SystemExit) as exit_:
            cli.main([])
        assert exit_.value.code == 130, (previous, blocked)
        assert capsys.readouterr().err.strip() == "error: interrupted: re-run to continue (what was done is kept)"
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # given back

        monkeypatch.setattr(cli, "app", broken)  # without Ctrl-C the same failure is what it is
        with pytest.raises(SystemExit) as exit_:
            cli.main([])
        assert exit_.value.code == 1 and "internal error: RuntimeError" in capsys.readouterr().err
    finally:
        signal.signal(signal.SIGINT, previous)
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
