"""Running train.py and infer.py as a user does, in a fresh interpreter, and checking how they fail: with exit
status 1 and one line on stderr that names the problem, never a traceback."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(script: str, args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    """`python <script> <args>` in `cwd`, as a user runs it (W&B offline, as kvlab makes it by default)."""
    return subprocess.run([sys.executable, str(ROOT / script), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "WANDB_MODE": "offline", **env})


def infer_in_process(run_dir: Path, args: list[str], capsys, monkeypatch) -> tuple[object, str]:
    """Run infer.py's main in this process (fast: no new interpreter) on the checkpoint in `run_dir`. Returns (exit
    code or message, output)."""
    monkeypatch.syspath_prepend(str(ROOT))  # infer.py is a script at the root, not part of an installed package
    from infer import main

    monkeypatch.setattr(sys, "argv", [str(ROOT / "infer.py"), f"ckpt={run_dir}", *args])
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def assert_one_line_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    """The run failed (status 1) without a traceback, and its last line of stderr holds every needle."""
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(("error: ", "invalid config: ")), result.stderr[-3000:]
    for needle in needles:
        assert needle in last, last


def analyze_quick(tmp_path: Path, name: str) -> tuple[dict, Path, subprocess.CompletedProcess]:
    """`python analyze.py quick=true analysis=<name>` in `tmp_path` (the shipped model): its report, its folder and
    the finished process; fails the test unless it exits 0."""
    result = run("analyze.py", ["quick=true", f"analysis={name}", "logger=none"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "runs" / "tiny-mha-pretrained" / "analysis" / name  # the shipped model's run folder
    return json.loads((out / f"{name}.json").read_text()), out, result
