"""The exercises cannot rot: every exercise test passes against the reference solutions (KVLAB_SOLUTIONS=1), every
one fails against the untouched stubs (so none passes trivially), and no package imports the exercises folder."""

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

from test_layout import ALLOWED  # tests/test_layout.py: the packages

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = (*ALLOWED, "bench")


def run_exercises(solutions: bool) -> dict[str, int]:
    """pytest exercises/ in a subprocess: {"passed": n, "failed": m, ...} from its summary line."""
    env = {**os.environ, "KVLAB_SOLUTIONS": "1" if solutions else "0"}
    done = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "exercises"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    summary = done.stdout.strip().splitlines()[-1]
    return {word: int(n) for n, word in re.findall(r"(\d+) (passed|failed|error|errors|skipped)", summary)}


def test_every_exercise_passes_against_its_solution_and_fails_against_its_stub():
    solved, stubs = run_exercises(solutions=True), run_exercises(solutions=False)
    assert solved.get("passed", 0) >= 10 and set(solved) == {"passed"}, f"reference solutions: {solved}"
    assert stubs == {"failed": solved["passed"]}, f"stubs: {stubs} (every test must fail until a student writes it)"


def test_no_package_imports_the_exercises():
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                        [node.module or ""] if isinstance(node, ast.ImportFrom) else []
                assert not any(n.split(".")[0] == "exercises" for n in names), f"{path} imports the exercises"
