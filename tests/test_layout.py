"""The layout the design promises (shared/DESIGN.md, "Layout"): packages import one way, each only from those below
it, and no source file grows past 450 lines (a file that long holds two ideas).

Every import counts: at module level, inside functions, under `if TYPE_CHECKING:`, and `importlib.import_module`
or `__import__` with a literal name, because a lazy import is still a dependency.
"""

import ast
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# package -> the other packages of ours it may import (each may always import itself)
ALLOWED = {
    "toymodel": set(),
    "corpus": set(),
    "tracking": set(),
    "cache": {"toymodel"},
    "memhier": {"cache", "toymodel"},
    "serving": {"memhier", "cache", "toymodel", "corpus", "tracking"},
    "training": {"toymodel", "corpus", "tracking"},
    "analysis": {"serving", "memhier", "cache", "toymodel", "corpus", "tracking"},
}
MAX_LINES = 450


def our_top_level_names() -> set[str]:
    """Every name an import of ours can start with: the repo's packages and its top-level scripts."""
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")}
    return packages | {p.stem for p in ROOT.glob("*.py")} | set(ALLOWED)


def imported_modules(tree: ast.Module, module: str) -> list[tuple[int, str]]:
    """(line, absolute module name) for every import in `tree`, the file of dotted module `module`."""
    package = module.split(".")[:-1]  # what `from . import` means here (for pkg/__init__.py too: pkg)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                found.append((node.lineno, node.module))
            else:  # relative: `from . import x` is the file's own package, `..` one above it
                base = package[: len(package) - (node.level - 1)]
                found.append((node.lineno, ".".join(base + ([node.module] if node.module else []))))
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and ((isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                   or (isinstance(node.func, ast.Name) and node.func.id in ("import_module", "__import__")))):
            found.append((node.lineno, node.args[0].value))
    return sorted(found)


def import_violations() -> list[str]:
    ours = our_top_level_names()
    problems = []
    for package, allowed in ALLOWED.items():
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT)
            module = ".".join(rel.with_suffix("").parts)
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(rel))
            for line, name in imported_modules(tree, module):
                top = name.split(".")[0]
                if top in ours and top != package and top not in allowed:
                    may = ", ".join(sorted(allowed)) or "nothing of ours"
                    problems.append(f"{rel}:{line}: imports {name} ({package} may import {may})")
    return problems


def in_virtual_env(path: Path, root: Path = ROOT) -> bool:
    """True for a file inside a virtual environment under `root` (any name: a folder holding pyvenv.cfg)."""
    return any((root / parent / "pyvenv.cfg").is_file() for parent in path.relative_to(root).parents
               if parent != Path("."))


def source_files() -> list[Path]:
    """The project's own .py and .c files: tracked, or new and not ignored; never what a user installed into a
    virtual environment inside the checkout (python3 -m venv .venv: the README's install lines work there)."""
    try:
        listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.py", "*.c"],
                                cwd=ROOT, capture_output=True, text=True, check=True).stdout.split("\n")
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: git ls-files cannot list the source files")
    return [ROOT / name for name in listed if name and (ROOT / name).is_file() and not in_virtual_env(ROOT / name)]


def test_a_virtual_environment_in_the_checkout_is_not_the_project(tmp_path):
    """A venv under any name (not only the .venv/ that .gitignore lists) holds torch's files, not ours."""
    (tmp_path / "env" / "lib").mkdir(parents=True)
    (tmp_path / "env" / "pyvenv.cfg").write_text("home = /usr/bin\n")
    assert in_virtual_env(tmp_path / "env" / "lib" / "big.py", tmp_path)
    assert not in_virtual_env(tmp_path / "cache" / "base.py", tmp_path)


def test_packages_import_one_way():
    problems = import_violations()
    assert not problems, "imports against the layout (shared/DESIGN.md):\n" + "\n".join(problems)


def test_the_layout_check_sees_lazy_and_type_checking_imports():
    source = ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from memhier.cache import X\n"
              "def f():\n    import serving.config\n    from . import rope\n    from .. import cache\n"
              "    importlib.import_module('corpus.tokenizer')\n")
    found = imported_modules(ast.parse(source), "toymodel.kernels.native")
    assert found == [(1, "typing"), (3, "memhier.cache"), (5, "serving.config"), (6, "toymodel.kernels"),
                     (7, "toymodel"), (8, "corpus.tokenizer")]


def test_no_source_file_is_over_450_lines():
    long = []
    for path in source_files():
        n = len(path.read_text(encoding="utf-8", errors="replace").splitlines())
        if n > MAX_LINES:
            long.append(f"{path.relative_to(ROOT)}: {n} lines (at most {MAX_LINES}: split it, it holds two ideas)")
    assert not long, "source files over the limit (shared/STYLE.md):\n" + "\n".join(long)
