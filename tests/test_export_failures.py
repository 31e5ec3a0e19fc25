"""deeplab-export failure behaviour: options that do not apply, empty folders, missing folders, a full disk, a
killed export's leftovers, unexpected errors and Ctrl-C: one line, the right exit code, nothing half written."""
import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import tensorflow as tf

from deeplab_keras.export import ExportError, onnx as onnx_export
from deeplab_keras.export import saved_model as sm_export
from deeplab_keras.export import staging
from deeplab_keras.cli import export_main as main
from tests.conftest import REPO

TINY_ARGS = ["--backbone", "resnet50", "--width-multiplier", "0.125", "--stage-blocks", "1", "1", "1", "1",
             "--num-classes", "3", "--quiet"]
ONNX_ARGS = TINY_ARGS + ["--format", "onnx", "--input-size", "33", "33", "--num-samples", "1"]


def _main(args):
    try:
        return main(args)
    except SystemExit as e:
        return e.code


def _everything(folder):
    """All names under ``folder``, hidden ones included, relative."""
    return sorted(os.path.relpath(os.path.join(d, n), folder) for d, dirs, files in os.walk(folder)
                  for n in dirs + files)


@pytest.mark.parametrize("args, message", [
    (["--format", "tflite", "--opset", "17"], "--opset applies only to --format onnx"),
    (["--format", "saved_model", "--outputs", "full"], "--outputs applies only to --format tflite / onnx"),
    (["--format", "onnx", "--num-calibration", "8"], "--num-calibration applies only to --quantize int8"),
    (["--format", "onnx", "--int8-io"], "--int8-io applies only to --format tflite --quantize int8"),
    (["--format", "onnx", "--crf-iterations", "5"], "--crf-iterations applies only to --crf"),
    (["--format", "saved_model", "--version", "-1"], "--version must be >= 0"),
])
def test_options_that_do_not_apply_exit_2(args, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = _main(TINY_ARGS + args + ["--out", "x"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, err
    assert not list(tmp_path.iterdir())


def test_model_options_with_a_checkpoint_exit_2(tmp_path, capsys):
    (tmp_path / "m.keras").write_bytes(b"not read: the arguments are checked first")
    code = _main(["--checkpoint", str(tmp_path / "m.keras"), "--num-classes", "5", "--format", "onnx", "--out",
                  str(tmp_path / "m.onnx")])
    err = capsys.readouterr().err
    assert code == 2 and "--num-classes applies only to --backbone" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("extra", [["--format", "tflite", "--quantize", "int8"], ["--format", "onnx"]])
def test_empty_image_folder_exit_2(extra, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    flag = "--data"  # calibration (int8) and verification images
    code = _main(TINY_ARGS + extra + [flag, str(empty), "--out", str(tmp_path / "out" / "m.x")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert flag in err and "no .jpg" in err and str(empty) in err
    assert _everything(tmp_path) == ["empty"]


def test_unreadable_sample_image_is_one_line(tmp_path, capsys):
    folder = tmp_path / "samples"
    folder.mkdir()
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    code = _main(ONNX_ARGS + ["--data", str(folder), "--out", str(tmp_path / "m.onnx")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "broken.jpg" in err, err
    assert _everything(tmp_path) == ["samples", "samples/broken.jpg"]


def test_missing_parent_folders_are_created_and_named(tmp_path, capsys):
    """onnx and saved_model alike: missing folders are created, said in the last line and the report."""
    out = tmp_path / "a" / "b" / "m.onnx"
    assert _main(ONNX_ARGS + ["--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert f"created folder {tmp_path / 'a'}" in stdout and f"created folder {tmp_path / 'a' / 'b'}" in stdout
    report = json.loads((tmp_path / "a" / "b" / "m.onnx.report.json").read_text())
    assert report["created_dirs"] == [str(tmp_path / "a"), str(tmp_path / "a" / "b")]

    base = tmp_path / "c" / "serving"
    assert _main(TINY_ARGS + ["--format", "saved_model", "--verify-size", "33", "33", "--num-samples", "1",
                              "--out", str(base)]) == 0
    assert f"created folder {tmp_path / 'c'}" in capsys.readouterr().out
    assert (base / "1" / "saved_model.pb").is_file()


def test_failed_export_removes_the_folders_it_created(tmp_path, capsys, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("converter exploded")

    monkeypatch.setattr(onnx_export, "convert", broken)
    assert _main(ONNX_ARGS + ["--out", str(tmp_path / "a" / "b" / "m.onnx")]) == 1
    err = capsys.readouterr().err
    assert err.strip().splitlines() == ["deeplab-export: error: converter exploded (RuntimeError; rerun with "
                                        "--debug for the traceback)"]
    assert _everything(tmp_path) == []
    with pytest.raises(RuntimeError, match="exploded"):  # --debug: the traceback
        main(ONNX_ARGS + ["--debug", "--out", str(tmp_path / "m.onnx")])
    assert _everything(tmp_path) == []


def test_ctrl_c_is_one_line_exit_130(tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(onnx_export, "convert", interrupted)
    assert _main(ONNX_ARGS + ["--out", str(tmp_path / "m.onnx")]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "interrupted" in err[0]
    assert _everything(tmp_path) == []


class _FullDisk:
    """``open`` for the exporter module: files opened for writing take half the data, then fail with ENOSPC."""

    def __init__(self, real=open):
        self.real = real

    def __call__(self, path, mode="r", *args, **kwargs):
        handle = self.real(path, mode, *args, **kwargs)
        if "w" not in mode:
            return handle
        write = handle.write

        def partial(data):
            write(data[:len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

        handle.write = partial
        return handle


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(args[0]) if args else None)


def _tf_no_space(self, path, **kwargs):
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "saved_model.pb"), "wb") as f:
        f.write(b"half")
    raise tf.errors.UnknownError(None, None, f"{path}/variables/variables.data-00000-of-00001; No space left on "
                                             "device")


@pytest.mark.parametrize("where", ["artifact", "report", "saved_model"])
def test_full_disk_is_one_line_exit_1_and_nothing_is_left(where, tmp_path, capsys, monkeypatch):
    """ENOSPC while writing the artifact (half written), its report, or the SavedModel (TensorFlow's error)."""
    out = tmp_path / "new" / "m.onnx"
    args = ONNX_ARGS + ["--out", str(out)]
    if where == "artifact":
        monkeypatch.setattr(onnx_export, "open", _FullDisk(), raising=False)
    elif where == "report":
        monkeypatch.setattr(staging, "atomic_write_json", _no_space)
    else:
        import keras
        monkeypatch.setattr(type(keras.export.ExportArchive()), "write_out", _tf_no_space)  # the backend's class
        out = tmp_path / "new" / "serving"
        args = TINY_ARGS + ["--format", "saved_model", "--verify-size", "33", "33", "--num-samples", "1", "--out",
                            str(out)]
    assert _main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no space left on device" in err[0] and "nothing was written" in err[0], err
    assert _everything(tmp_path) == []  # no artifact, report, staging folder or created folder


def test_full_disk_while_replacing_keeps_the_old_artifact(tmp_path, capsys, monkeypatch):
    out = tmp_path / "m.onnx"
    out.write_bytes(b"old model")
    (tmp_path / "m.onnx.report.json").write_text("{}")
    monkeypatch.setattr(onnx_export, "open", _FullDisk(), raising=False)
    assert _main(ONNX_ARGS + ["--overwrite", "--out", str(out)]) == 1
    assert "no space left" in capsys.readouterr().err
    assert out.read_bytes() == b"old model" and _everything(tmp_path) == ["m.onnx", "m.onnx.report.json"]


def _dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_sweep_removes_only_stale_staging_folders(tmp_path):
    import psutil

    dead, now = _dead_pid(), int(time.time())
    me = f"{os.getpid()}.{int(psutil.Process().create_time())}"
    stale = tmp_path / f".m.onnx.tmp-{dead}.{now}-abc123"          # killed mid-export
    stale.mkdir()
    (stale / "m.onnx").write_bytes(b"half")
    reused = tmp_path / f".1.tmp-{os.getpid()}.{now - 10 ** 6}-x"   # our pid, but another process's start time
    reused.mkdir()
    aside = tmp_path / f".m.tflite.old-{dead}.{now}-def456"        # killed between the two renames of a replace
    (aside / "old").mkdir(parents=True)
    (aside / "old" / "payload").write_bytes(b"previous artifact")
    legacy = tmp_path / ".m.onnx.tmp-abcd1234"                       # no owner tag, older than this process
    legacy.mkdir()
    os.utime(legacy, (0, 0))
    live = tmp_path / f".m.onnx.tmp-{me}-live"                       # an export running now (this process)
    live.mkdir()
    mine = tmp_path / ".config.tmp-notours"                          # not a staging name
    mine.mkdir()
    removed = staging.sweep_stale(str(tmp_path))
    assert sorted(removed) == sorted(str(p) for p in (stale, reused, aside, legacy))
    assert sorted(os.listdir(tmp_path)) == sorted([live.name, mine.name, "m.tflite"])
    assert (tmp_path / "m.tflite" / "payload").read_bytes() == b"previous artifact"  # put back, not lost


def test_killed_export_leftovers_are_removed_by_the_next_export(tmp_path):
    """SIGKILL an export in the middle of its conversion; the next export into the same folder cleans up."""
    out = tmp_path / "m.onnx"
    child = textwrap.dedent("""
        import sys, time
        from deeplab_keras import cli
        from deeplab_keras.export import onnx
        def stuck(*args, **kwargs):
            print("converting", flush=True)
            time.sleep(600)
        onnx.convert = stuck
        sys.exit(cli.export_main(sys.argv[1:]))
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.Popen([sys.executable, "-c", child] + ONNX_ARGS + ["--out", str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "converting"
        hidden = [n for n in os.listdir(tmp_path) if n.startswith(".m.onnx.tmp-")]
        assert len(hidden) == 1
        (tmp_path / hidden[0] / "partial").write_bytes(b"half")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert os.listdir(tmp_path) == hidden  # the kill left its staging folder
    assert main(ONNX_ARGS + ["--out", str(out)]) == 0
    assert sorted(os.listdir(tmp_path)) == ["m.onnx", "m.onnx.report.json"]


def test_saved_model_without_serving_default_is_one_line(tmp_path):
    module = tf.Module()
    module.f = tf.function(lambda x: {"y": x + 1}, input_signature=[tf.TensorSpec([None], tf.float32)])
    tf.saved_model.save(module, str(tmp_path / "other"), signatures={"predict": module.f})
    with pytest.raises(ExportError) as info:
        sm_export.run_saved_model(str(tmp_path / "other"), np.zeros((1, 8, 8, 3), np.uint8))
    message = str(info.value)
    assert "no 'serving_default' signature" in message and "['predict']" in message and "\n" not in message
    with pytest.raises(ExportError, match="not a SavedModel directory"):
        sm_export.load_signature(str(tmp_path))


def test_int8_without_representative_data_warns_loudly(tmp_path, capsys):
    out = tmp_path / "m.tflite"
    assert _main(TINY_ARGS + ["--format", "tflite", "--quantize", "int8", "--input-size", "33", "33",
                              "--num-calibration", "2", "--num-samples", "1", "--out", str(out)]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "WARNING" in line]
    assert len(warnings) == 1 and "synthetic" in warnings[0] and "--data" in warnings[0]
    assert "label agreement" in warnings[0]  # --quiet does not hide it
    report = json.loads((tmp_path / "m.tflite.report.json").read_text())
    assert report["calibration"] == "synthetic" and report["warnings"] == [warnings[0].split("WARNING: ")[1]]
