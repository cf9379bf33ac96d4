"""A native module built from other sources than the tree's is refused at import."""

import shutil

import pytest

from hybridmig.bindings import _ffi
from hybridmig.errors import StaleNativeModule


def test_the_module_in_use_was_built_from_these_sources():
    assert (_ffi.NATIVE_SOURCES / "digest.py").is_file(), "the tests run from an editable install"
    _ffi.check_fresh()


def test_a_copy_of_the_same_sources_elsewhere_is_fresh(tmp_path):
    shutil.copytree(_ffi.NATIVE_SOURCES, tmp_path / "native")
    _ffi.check_fresh(tmp_path / "native")


@pytest.mark.parametrize("edit", ["src/ranges.c", "api/pagestore.h", "src/common.h", "build.py"])
def test_changed_sources_are_refused(tmp_path, edit):
    native = tmp_path / "native"
    shutil.copytree(_ffi.NATIVE_SOURCES, native)
    with open(native / edit, "a") as f:
        f.write("\n")
    with pytest.raises(StaleNativeModule, match=r"make setup") as refused:
        _ffi.check_fresh(native)
    assert isinstance(refused.value, ImportError)


def test_a_new_source_file_is_refused(tmp_path):
    native = tmp_path / "native"
    shutil.copytree(_ffi.NATIVE_SOURCES, native)
    (native / "src" / "extra.c").write_text("int hm_extra;\n")
    with pytest.raises(StaleNativeModule):
        _ffi.check_fresh(native)


def test_without_sources_beside_it_nothing_is_checked(tmp_path):
    """An installed wheel: the module is the one built with it."""
    _ffi.check_fresh(tmp_path)
