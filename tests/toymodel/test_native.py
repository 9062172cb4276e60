"""Building the C kernels (toymodel/kernels/native.py): once per source into the user cache dir, atomically, with the
compiler's messages when it fails and a named reason when there is no compiler."""

import os
import shutil

import pytest

from toymodel.kernels.native import load_library

pytestmark = pytest.mark.skipif(shutil.which(os.environ.get("CC", "cc")) is None, reason="no C compiler")

FLAGS = ("-O1", "-shared", "-fPIC")


def test_a_library_is_built_once_per_source_into_the_user_cache(monkeypatch, tmp_path):
    """Named by the source's stem and a hash of the source (and flags, CPU); a second load reuses the file."""
    source = tmp_path / "kernel.c"
    source.write_text("int kvlab_answer(void) { return 41; }\n")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert load_library(source, FLAGS).kvlab_answer() == 41
    (built,) = (tmp_path / "cache" / "kvlab").iterdir()
    assert built.name.startswith("kernel-") and built.suffix == ".so"
    mtime = built.stat().st_mtime_ns
    load_library(source, FLAGS)
    assert built.stat().st_mtime_ns == mtime  # loaded, not compiled again
    source.write_text("int kvlab_answer(void) { return 42; }\n")
    assert load_library(source, FLAGS).kvlab_answer() == 42
    load_library(source, FLAGS + ("-O2",))
    assert len(list((tmp_path / "cache" / "kvlab").iterdir())) == 3  # a new source or new flags, a new name


def test_without_a_compiler_the_error_names_it(monkeypatch, tmp_path):
    source = tmp_path / "kernel.c"
    source.write_text("int kvlab_answer(void) { return 41; }\n")
    monkeypatch.setenv("CC", "no-such-compiler-kvlab")
    with pytest.raises(RuntimeError, match="no C compiler found"):
        load_library(source, FLAGS)


def test_a_failed_compile_reports_the_compiler_messages_and_leaves_no_file(monkeypatch, tmp_path):
    broken = tmp_path / "kernel.c"
    broken.write_text("int kvlab_answer(void) { return oops; }\n")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with pytest.raises(RuntimeError, match="(?s)failed.*oops"):
        load_library(broken, FLAGS)
    assert list((tmp_path / "cache" / "kvlab").iterdir()) == []  # the temp file is gone, nothing half-written
