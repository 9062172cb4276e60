"""Which version the exercise tests check: yours (the stubs in this folder), or, with KVLAB_SOLUTIONS=1, the
reference solutions in solutions/ (CI checks both: the solutions pass, the untouched stubs fail).

    pytest exercises/                          # your answers
    KVLAB_SOLUTIONS=1 pytest exercises/        # the reference solutions
"""

import importlib.util
import os
from pathlib import Path
from types import ModuleType

HERE = Path(__file__).resolve().parent


def load(name: str) -> ModuleType:
    """The exercise module `name` (a file of this folder, or of solutions/ with KVLAB_SOLUTIONS=1)."""
    folder = HERE / "solutions" if os.environ.get("KVLAB_SOLUTIONS") == "1" else HERE
    spec = importlib.util.spec_from_file_location(f"exercise_{name}", folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
