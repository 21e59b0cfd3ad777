"""`ramcli` in a fresh interpreter, reporting which modules the run loaded.

A test process has long imported everything, so only a new interpreter shows what a command
itself imports: the light command line (`--help`, usage errors) and inference without the
training package are both checked this way.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

#: Runs the real entry point, then reports its exit code and every module loaded as the last line
#: of stderr (which `FreshRun.stderr` leaves out).
DRIVER = """
import json, sys
from ramcli.cli.app import main
try:
    main(sys.argv[1:])
    code = 0
except SystemExit as exc:
    code = exc.code or 0
print("LOADED " + json.dumps({"code": code, "modules": sorted(sys.modules)}), file=sys.stderr)
"""


@dataclass(frozen=True)
class FreshRun:
    code: int
    modules: frozenset[str] = field(repr=False)
    stdout: str
    stderr: str

    def modules_of(self, packages) -> list[str]:
        """The modules the run loaded from `packages` (top-level names)."""
        return sorted(m for m in self.modules if m.split(".")[0] in packages)


def run_ramcli(*args: str, home: Path, cwd: Path | None = None, extra_env: dict | None = None,
               timeout: float = 600) -> FreshRun:
    env = {**os.environ, "RAMCLI_HOME": str(home), **(extra_env or {}),
           "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    done = subprocess.run([sys.executable, "-c", DRIVER, *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=cwd, check=False)
    *own, line = done.stderr.splitlines(keepends=True) or [""]
    assert line.startswith("LOADED "), done.stderr
    report = json.loads(line.removeprefix("LOADED "))
    return FreshRun(report["code"], frozenset(report["modules"]), done.stdout, "".join(own))
