"""deeplab_keras.locks: exclusive lock files (one holder, pid inside, taken over from dead holders)."""
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from deeplab_keras import locks
from deeplab_keras.locks import LockedError, exclusive_lock

LOCKS_FILE = locks.__file__
# A second process that takes the lock through the real helper (locks.py loaded alone: no TensorFlow import).
HOLDER = f"""
import importlib.util, sys, time
spec = importlib.util.spec_from_file_location("locks", {LOCKS_FILE!r}); u = importlib.util.module_from_spec(spec)
spec.loader.exec_module(u)
with u.exclusive_lock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(float(sys.argv[2]))
"""


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
