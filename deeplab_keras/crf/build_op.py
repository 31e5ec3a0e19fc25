"""Compiles the dense-CRF TensorFlow op library from the C++ sources next to this file.

Run ``python -m deeplab_keras.crf.build_op`` (or ``pip install --no-build-isolation -e .``, whose build_ext
calls :func:`build`). Needs g++ (C++17) and the installed pip TensorFlow, whose headers and
``tf.sysconfig`` flags the library is compiled against. The library embeds a stamp (TensorFlow version +
hash of the sources and flags) that the loader compares to decide whether it is stale.

This module imports only the standard library and ``tensorflow.sysconfig`` (setup.py loads it by file path).
"""
import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
LIB_NAME = "_dense_crf_op"
SOURCES = ("dense_crf_op.cc", "dense_crf.cc")
HEADERS = ("dense_crf.h", "permutohedral.h")
# Portable code generation: the hot loops are compiled a second time for AVX2+FMA (target attribute) and the
# CPU picks one at run time, so no -march flag is needed and the library runs on any x86-64 CPU.
CXXFLAGS = ("-std=c++17", "-O3", "-fPIC", "-shared", "-DNDEBUG", "-Wno-deprecated-declarations", "-Wno-psabi")
STAMP_MARKER = b"DKCRF_STAMP["


def default_out_path():
    """The library path inside the package: ``deeplab_keras/crf/_dense_crf_op<EXT_SUFFIX>``."""
    return os.path.join(HERE, LIB_NAME + (sysconfig.get_config_var("EXT_SUFFIX") or ".so"))


def _tf_sysconfig():
    from tensorflow import sysconfig as tf_sysconfig  # heavy import only when building
    from tensorflow import version as tf_version
    return tf_sysconfig, tf_version


def expected_stamp(tf_version=None, tf_git_version=None):
    """The stamp a current library carries: TensorFlow version and a hash of sources, headers and flags.

    Args:
        tf_version, tf_git_version: TensorFlow's ``tf.version.VERSION`` / ``GIT_VERSION``; read from the
            installed TensorFlow when None.
    """
    if tf_version is None or tf_git_version is None:
        _, version = _tf_sysconfig()
        tf_version, tf_git_version = version.VERSION, version.GIT_VERSION
    digest = hashlib.sha256()
    for name in SOURCES + HEADERS:
        with open(os.path.join(HERE, name), "rb") as f:
            digest.update(name.encode() + b"\0" + f.read() + b"\0")
    digest.update(" ".join(CXXFLAGS).encode())
    return f"tf={tf_version};git={tf_git_version};src={digest.hexdigest()[:16]}"


def read_stamp(path):
    """The stamp embedded in a built library, or None when the file is missing or has none."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return None
    start = data.find(STAMP_MARKER)
    if start < 0:
        return None
    start += len(STAMP_MARKER)
    end = data.find(b"]", start)
    return data[start:end].decode("ascii", "replace") if end > 0 else None


def find_compiler():
    """Path of the C++ compiler ($CXX or g++), or None."""
    return shutil.which(os.environ.get("CXX", "g++"))


def build(out_path=None, verbose=False):
    """Compiles the op library and writes it atomically to ``out_path``.

    Args:
        out_path: where to write the shared library; default :func:`default_out_path`.
        verbose: print the compiler command line.

    Returns:
        The path written.

    Raises:
        RuntimeError: no compiler, or the compilation failed (the message holds the command and its errors).
    """
    out_path = os.path.abspath(out_path or default_out_path())
    cxx = find_compiler()
    if cxx is None:
        raise RuntimeError(
            "Building the dense-CRF op needs a C++17 compiler: install g++ (e.g. `apt-get install g++`) or set "
            "$CXX, then run `python -m deeplab_keras.crf.build_op`.")
    tf_sysconfig, version = _tf_sysconfig()
    stamp = expected_stamp(version.VERSION, version.GIT_VERSION)
    out_dir = os.path.dirname(out_path)
    os.makedirs(out_dir, exist_ok=True)
    fd, tmp_path = tempfile.mkstemp(prefix=".tmp_" + LIB_NAME, suffix=".so", dir=out_dir)
    os.close(fd)
    cmd = [cxx, *CXXFLAGS, *[os.path.join(HERE, s) for s in SOURCES], "-o", tmp_path, f"-I{HERE}",
           f'-DDKCRF_BUILD_STAMP="{stamp}"', *tf_sysconfig.get_compile_flags(), *tf_sysconfig.get_link_flags()]
    if verbose:
        print("building the dense-CRF op:", " ".join(cmd), flush=True)
    try:
        result = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if result.returncode != 0:
            raise RuntimeError(
                f"Compiling the dense-CRF op failed (exit {result.returncode}).\nCommand: {' '.join(cmd)}\n"
                f"{result.stdout[-8000:]}")
        os.chmod(tmp_path, 0o755)
        os.replace(tmp_path, out_path)
    finally:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
    if verbose:
        print(f"wrote {out_path} ({stamp})", flush=True)
    return out_path


def main(argv=None):
    """Command line: ``python -m deeplab_keras.crf.build_op [--out PATH] [--quiet]``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help=f"output path (default: {default_out_path()})")
    parser.add_argument("--quiet", action="store_true", help="do not print the compiler command")
    args = parser.parse_args(argv)
    try:
        build(args.out, verbose=not args.quiet)
    except RuntimeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
