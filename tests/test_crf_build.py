"""Building and loading the dense-CRF op library: stamps, lazy loading, stale/missing libraries, setup.py hook."""
import os
import subprocess
import sys

import pytest

from deeplab_keras.crf import _loader, build_op

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_python(code, *args, timeout=300):
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout,
                          cwd=REPO)


def test_installed_library_is_current():
    import tensorflow as tf

    path = _loader.find_library()
    assert path is not None, "run `python -m deeplab_keras.crf.build_op` (or pip install -e .) first"
    stamp = build_op.read_stamp(path)
    assert stamp == build_op.expected_stamp()
    assert f"tf={tf.__version__}" in stamp


def test_importing_the_package_does_not_load_or_build_the_library():
    result = run_python(
        "import deeplab_keras as dk, deeplab_keras.crf._loader as loader, sys\n"
        "layer = dk.crf.DenseCRF()\n"
        "assert loader._library is None, 'library loaded at import'\n"
        "assert 'deeplab_keras.crf.build_op' not in sys.modules, 'build module imported at import'\n"
        "print('ok')\n")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ok" in result.stdout


@pytest.fixture
def isolated_paths(tmp_path, monkeypatch):
    """Points the loader at an empty package location and an empty user cache."""
    lib = tmp_path / "pkg" / os.path.basename(build_op.default_out_path())
    lib.parent.mkdir()
    monkeypatch.setattr(build_op, "default_out_path", lambda: str(lib))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return lib


def test_missing_library_without_compiler_says_how_to_build(isolated_paths, monkeypatch):
    monkeypatch.setattr(build_op, "find_compiler", lambda: None)
    with pytest.raises(_loader.OpLibraryError) as err:
        _loader.ensure_library()
    message = str(err.value)
    assert "does not exist" in message and str(isolated_paths) in message
    assert "python -m deeplab_keras.crf.build_op" in message and "g++" in message


def test_stale_library_without_compiler_names_both_versions(isolated_paths, monkeypatch):
    isolated_paths.write_bytes(b"\x7fELF...DKCRF_STAMP[tf=2.0.0;git=old;src=0000]...")
    monkeypatch.setattr(build_op, "find_compiler", lambda: None)
    with pytest.raises(_loader.OpLibraryError, match="stale") as err:
        _loader.ensure_library()
    assert "tf=2.0.0" in str(err.value) and build_op.expected_stamp() in str(err.value)


def test_build_failure_is_reported_with_the_command(isolated_paths, monkeypatch, tmp_path):
    fake = tmp_path / "fake-cxx"
    fake.write_text("#!/bin/sh\necho 'fatal: no such thing' >&2\nexit 3\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CXX", str(fake))
    with pytest.raises(_loader.OpLibraryError, match="exit 3") as err:
        _loader.ensure_library(verbose=False)
    assert "fatal: no such thing" in str(err.value) and "build_op" in str(err.value)
    assert not isolated_paths.exists()  # nothing half-written


@pytest.mark.slow
def test_stale_library_is_rebuilt_into_the_cache_when_the_package_is_read_only(isolated_paths, monkeypatch):
    isolated_paths.write_bytes(b"DKCRF_STAMP[tf=2.0.0;git=old;src=0000]")
    real_access = os.access
    monkeypatch.setattr(
        _loader.os, "access",
        lambda p, mode: False if os.path.abspath(p) == str(isolated_paths.parent) else real_access(p, mode))
    path = _loader.ensure_library(verbose=False)
    assert path != str(isolated_paths) and path.startswith(os.environ["XDG_CACHE_HOME"])
    assert build_op.read_stamp(path) == build_op.expected_stamp()
    assert _loader.find_library() == path
    # The rebuilt library works (in a fresh process: an op can be registered once per process).
    result = run_python(
        "import sys, numpy as np, tensorflow as tf\n"
        "lib = tf.load_op_library(sys.argv[1])\n"
        "out, _ = lib.dense_crf(np.full((1, 4, 4, 2), 0.5, np.float32), np.zeros((1, 4, 4, 3), np.uint8),\n"
        "                       3, 4., 67., 3., 3., 1., np.zeros([0], np.float32))\n"
        "assert np.allclose(out.numpy(), 0.5)\n"
        "print('ok')\n", path)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


def test_setup_py_can_load_build_op_by_file_path():
    """setup.py's build_ext loads build_op.py by path, before the package (or its dependencies) are importable."""
    result = run_python(
        "import importlib.util, sys\n"
        "spec = importlib.util.spec_from_file_location('_dk_build_op', 'deeplab_keras/crf/build_op.py')\n"
        "module = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(module)\n"
        "assert callable(module.build) and module.default_out_path().endswith('.so')\n"
        "assert not any(name.startswith('deeplab_keras') for name in sys.modules), 'package imported'\n"
        "assert 'tensorflow' not in sys.modules, 'tensorflow imported before build()'\n"
        "print('ok')\n")
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


def test_build_op_command_line_help():
    result = subprocess.run([sys.executable, "-m", "deeplab_keras.crf.build_op", "--help"], capture_output=True,
                            text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0 and "--out" in result.stdout
