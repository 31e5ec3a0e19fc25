"""deeplab_keras.utils: atomic writes (nothing half written, even on a full disk) and exclusive lock files."""
import errno
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from deeplab_keras import utils
from deeplab_keras.utils import LockedError, atomic_write, atomic_write_bytes, exclusive_lock

UTILS_FILE = utils.__file__
# A second process that takes the lock through the real helper (utils.py loaded alone: no TensorFlow import).
HOLDER = f"""
import importlib.util, sys, time
spec = importlib.util.spec_from_file_location("u", {UTILS_FILE!r}); u = importlib.util.module_from_spec(spec)
spec.loader.exec_module(u)
with u.exclusive_lock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def leftovers(folder):
    return sorted(n for n in os.listdir(folder) if n.startswith(".tmp-"))


def test_atomic_write_replaces_only_on_success(tmp_path):
    target = tmp_path / "a.txt"
    atomic_write_bytes(target, "old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_write(target, "w") as f:
            f.write("half")
            raise KeyboardInterrupt
    assert target.read_text() == "old" and leftovers(tmp_path) == []
    with atomic_write(target, "w") as f:
        f.write("new")
    assert target.read_text() == "new"
    assert oct(target.stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_atomic_write_disk_full_leaves_nothing(tmp_path, monkeypatch):
    target = tmp_path / "b.bin"
    atomic_write_bytes(target, b"kept")

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError) as err:
        atomic_write_bytes(target, b"x" * 1000)
    assert err.value.errno == errno.ENOSPC
    assert target.read_bytes() == b"kept" and leftovers(tmp_path) == []


def test_atomic_write_no_overwrite(tmp_path):
    target = tmp_path / "c.bin"
    atomic_write_bytes(target, b"first", overwrite=False)
    with pytest.raises(FileExistsError, match="c.bin exists"):
        atomic_write_bytes(target, b"second", overwrite=False)
    assert target.read_bytes() == b"first" and leftovers(tmp_path) == []
    with pytest.raises(ValueError, match="mode"):
        with atomic_write(target, "a"):
            pass


def test_lock_writes_pid_refuses_second_holder_and_is_removed(tmp_path):
    lock = tmp_path / "run" / ".lock"
    with exclusive_lock(lock, what="run directory run"):
        assert lock.read_text().split() == [str(os.getpid())]
        with pytest.raises(LockedError) as err:  # a second open file (another thread or caller) is refused
            with exclusive_lock(lock, what="run directory run"):
                pass
        assert isinstance(err.value, RuntimeError) and err.value.pid == os.getpid()
        message = str(err.value)
        assert "run directory run is in use by process" in message and str(lock) in message
        assert "\n" not in message
    assert not lock.exists()
    with exclusive_lock(lock):  # free again
        pass


def test_lock_held_by_another_process_then_killed(tmp_path):
    lock = tmp_path / "x.lock"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(lock), "60"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(LockedError, match=f"in use by process {holder.pid} "):
            with exclusive_lock(lock, what="the folder"):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert lock.read_text().split() == [str(holder.pid)]  # left behind by the killed holder: stale
    with exclusive_lock(lock):
        assert lock.read_text().split() == [str(os.getpid())]


def test_stale_lock_file_with_dead_pid_is_taken_over(tmp_path):
    lock = tmp_path / "y.lock"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock.write_text(dead.stdout)
    with exclusive_lock(lock):
        assert lock.read_text().split() == [str(os.getpid())]


def test_lock_waits_up_to_timeout(tmp_path):
    lock = tmp_path / "z.lock"
    order = []
    holding = threading.Event()

    def hold():
        with exclusive_lock(lock):
            holding.set()
            time.sleep(0.3)
            order.append("first released")

    thread = threading.Thread(target=hold)
    thread.start()
    holding.wait()
    with exclusive_lock(lock, timeout=10):
        order.append("second acquired")
    thread.join()
    assert order == ["first released", "second acquired"]


def test_many_threads_one_holder_at_a_time(tmp_path):
    lock, inside, overlaps = tmp_path / "w.lock", [], []

    def work():
        for _ in range(20):
            with exclusive_lock(lock, timeout=30, poll=0.001):
                inside.append(1)
                if len(inside) > 1:
                    overlaps.append(1)
                time.sleep(0.001)
                inside.pop()

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert overlaps == []


# A stand-in "tensorflow" package that prints TensorFlow's real start-up lines (as captured on a CPU-only machine)
# and one genuine error to file descriptor 2, the way the C++ library does.
FAKE_TF = r'''
import os
os.write(2, b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
            b"I0000 00:00:1796072127.374922    6768 port.cc:153] oneDNN custom operations are on.\n"
            b"I0000 00:00:1796072127.375298    6768 cudart_stub.cc:31] Could not find cuda drivers on your machine, "
            b"GPU will not be used.\n"
            b"E0000 00:00:1796072127.5    6768 op_kernel.cc:12] a genuine error\n")
class config:
    @staticmethod
    def list_physical_devices(kind):
        os.write(2, b"E0000 00:00:1796072227.448247    7997 cuda_platform.cc:52] failed call to cuInit: INTERNAL\n")
        return []
'''
QUIET = f"""
import importlib.util, sys
spec = importlib.util.spec_from_file_location("u", {UTILS_FILE!r}); u = importlib.util.module_from_spec(spec)
spec.loader.exec_module(u)
u.quiet_tensorflow(debug=sys.argv[1] == "debug")
print("after import", file=sys.stderr)
u.quiet_tensorflow(debug=sys.argv[2] == "debug")
"""
NOISE = ("InitializeLog", "oneDNN", "cuda drivers", "cuInit")


@pytest.mark.parametrize("first, second", [("quiet", "quiet"), ("debug", "quiet"), ("quiet", "debug")])
def test_quiet_tensorflow_hides_start_up_noise_only(tmp_path, first, second):
    (tmp_path / "tensorflow").mkdir()
    (tmp_path / "tensorflow" / "__init__.py").write_text(FAKE_TF)
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    result = subprocess.run([sys.executable, "-c", QUIET, first, second], capture_output=True, text=True, env=env,
                            check=True)
    lines = result.stderr.splitlines()
    assert sum("a genuine error" in line for line in lines) == 1  # real errors are never hidden
    noise = [line for line in lines if any(word in line for word in NOISE)]
    if first == second == "quiet":
        assert noise == [] and lines == [lines[0], "after import"]
    else:  # --debug shows the start-up lines, at import or replayed later
        assert len(noise) == 4
        assert (lines.index("after import") > lines.index(noise[0])) == (first == "debug")


@pytest.mark.slow
def test_package_import_and_first_op_print_nothing():
    code = ("import numpy as np, deeplab_keras as dk, tensorflow as tf; tf.constant([1.0]) * 2; "
            "dk.DeepLabV2(num_classes=2, backbone='vgg16')(np.zeros((1, 33, 33, 3), 'float32'))")
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert result.stderr == ""


@pytest.mark.slow
def test_every_command_starts_without_tensorflow_noise(tmp_path):
    """Each CLI imports TensorFlow and (eval, export) runs a model: no CUDA/oneDNN start-up lines on stderr."""
    from tests.conftest import tiny_model
    tiny_model(2, "vgg16").save(tmp_path / "tiny.keras")
    run = "import sys; from {module} import {main}; sys.exit({main}(sys.argv[1:]))"
    commands = {
        "train": ("deeplab_keras.cli", "train_main", ["--config", "tiny_cpu", "--print-config"]),
        "eval": ("deeplab_keras.cli", "eval_main", ["--checkpoint", str(tmp_path / "tiny.keras"), "--data",
                                                    "synthetic", "--num-images", "2", "--image-size", "33", "33",
                                                    "--quiet", "--out", str(tmp_path / "eval.json")]),
        "export": ("deeplab_keras.cli", "export_main", ["--checkpoint", str(tmp_path / "tiny.keras"), "--format",
                                                         "saved_model", "--out", str(tmp_path / "sm"), "--quiet",
                                                         "--num-samples", "1", "--verify-size", "33", "33"]),
        "demo": ("deeplab_keras.cli", "demo_main", ["--steps", "0"]),
    }
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    procs = {name: subprocess.Popen([sys.executable, "-c", run.format(module=module, main=main)] + args,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
             for name, (module, main, args) in commands.items()}
    results = {name: (p.wait(), p.stderr.read()) for name, p in procs.items()}
    for name, (code, stderr) in results.items():
        assert not [line for line in stderr.splitlines() if any(word in line for word in NOISE)], (name, stderr)
        assert "Traceback" not in stderr, (name, stderr)
    assert [results[name][0] for name in commands] == [0, 0, 0, 2], results
    assert (tmp_path / "eval.json").exists() and (tmp_path / "sm").is_dir()
