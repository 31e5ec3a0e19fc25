"""deeplab-export command line: help, one-line errors with exit code 2, checkpoints, reports, --crf."""
import json
import os
import shutil
import subprocess

import pytest

from deeplab_keras.cli import export_main as main
from tests.conftest import tiny_model

TINY_ARGS = ["--backbone", "resnet50", "--width-multiplier", "0.125", "--stage-blocks", "1", "1", "1", "1",
             "--num-classes", "3", "--quiet"]


def _cli():
    exe = shutil.which("deeplab-export")
    assert exe, "the deeplab-export console script is not installed: run `pip install --no-build-isolation -e .`"
    return exe


def _run(args, **kwargs):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run([_cli()] + args, capture_output=True, text=True, timeout=600, env=env, **kwargs)


def _error_lines(err):
    """stderr lines written by deeplab-export itself (TF/absl start-up logging filtered out)."""
    return [line for line in err.splitlines() if line.startswith("deeplab-export")]


def test_help():
    proc = _run(["--help"])
    assert proc.returncode == 0
    for needle in ("--format", "saved_model", "tflite", "onnx", "--checkpoint", "--quantize", "--input-size",
                   "--opset", "--overwrite", "--crf", "--data", "--int8-io", "--num-classes", "--msc-scales"):
        assert needle in proc.stdout, needle


@pytest.mark.parametrize("args, message", [
    (["--backbone", "resnet50", "--format", "pdf", "--out", "x"], "invalid choice: 'pdf'"),
    (["--checkpoint", "missing.keras", "--format", "onnx", "--out", "x.onnx"], "missing.keras"),
    (["--backbone", "resnet50", "--format", "onnx", "--out", "/etc/hostname/x.onnx"], "not a directory"),
    (["--backbone", "resnet50", "--format", "onnx", "--quantize", "float16", "--out", "x.onnx"], "--quantize"),
    (["--backbone", "resnet50", "--format", "onnx", "--int8-io", "--quantize", "int8", "--out", "x.onnx"],
     "--int8-io"),
    (["--backbone", "resnet50", "--format", "tflite", "--int8-io", "--out", "x.tflite"], "--int8-io"),
    (["--backbone", "resnet50", "--format", "saved_model", "--input-size", "65", "65", "--out", "x"],
     "--input-size"),
    (["--backbone", "resnet50", "--format", "onnx", "--opset", "11", "--out", "x.onnx"], "opset"),
    (["--format", "onnx", "--out", "x.onnx"], "--checkpoint --preset --backbone"),
])
def test_bad_arguments_exit_2_with_one_line(args, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    try:
        code = main(args)
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and message in err, err
    assert not list(tmp_path.iterdir())  # nothing written


def test_existing_artifact_needs_overwrite(tmp_path, capsys):
    (tmp_path / "m.onnx").write_bytes(b"old")
    with pytest.raises(SystemExit) as e:
        main(TINY_ARGS + ["--format", "onnx", "--out", str(tmp_path / "m.onnx")])
    code = e.value.code
    err = capsys.readouterr().err
    assert code == 2 and "--overwrite" in err and len(err.strip().splitlines()) == 1
    assert (tmp_path / "m.onnx").read_bytes() == b"old"


def test_checkpoint_run_directory_to_tflite(tmp_path, voc_samples_dir):
    """The console script end to end: a training run directory in, verified .tflite + JSON report out."""
    run = tmp_path / "run"
    run.mkdir()
    tiny_model(3, "resnet50").save(run / "model.keras")
    out = tmp_path / "out" / "deeplab.tflite"
    proc = _run(["--checkpoint", str(run), "--format", "tflite", "--input-size", "49", "65", "--out", str(out),
                 "--data", str(voc_samples_dir / "VOC2012"), "--num-samples", "2"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    progress = [line for line in proc.stderr.splitlines() if line.startswith("[deeplab-export]")]
    assert any("converting to TFLite" in line for line in progress)
    assert any("label agreement" in line for line in progress)
    report = json.loads(out.with_name("deeplab.tflite.report.json").read_text())
    assert report["verification"]["passed"] and report["input_size"] == [49, 65] and out.is_file()
    assert str(out) in proc.stdout


def test_verification_failure_exits_1_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "m.onnx"
    code = main(TINY_ARGS + ["--format", "onnx", "--input-size", "33", "33", "--num-samples", "1",
                             "--max-diff", "1e-12", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 1 and "verification failed" in err
    assert not out.exists()
    assert json.loads((tmp_path / "m.onnx.report.json").read_text())["verification"]["passed"] is False


@pytest.mark.slow
@pytest.mark.parametrize("fmt, extra", [("saved_model", []), ("tflite", ["--input-size", "33", "41"]),
                                        ("onnx", [])])
def test_crf_in_every_format(fmt, extra, tmp_path):
    """--crf puts the stock-op CRF into the graph; the artifact matches Keras + CRF within fp32 tolerance."""
    out = tmp_path / {"saved_model": "sm", "tflite": "m.tflite", "onnx": "m.onnx"}[fmt]
    code = main(TINY_ARGS + ["--format", fmt, "--crf", "--crf-iterations", "3", "--verify-size", "33", "41",
                             "--num-samples", "1", "--out", str(out)] + extra)
    assert code == 0
    report_path = (out / "1.report.json") if fmt == "saved_model" else out.with_name(out.name + ".report.json")
    report = json.loads(report_path.read_text())
    runtime = {"saved_model": "tf", "tflite": "litert", "onnx": "onnx"}[fmt]
    assert report["with_crf"] and report["crf"]["iterations"] == 3 and report["crf"]["runtime"] == runtime
    assert report["verification"]["passed"]
    if fmt == "saved_model":
        from deeplab_keras.export.saved_model import non_stock_ops
        assert non_stock_ops(str(out / "1")) == []
    if fmt == "tflite":
        assert not [op for op in report["ops"] if "FLEX" in op or "CUSTOM" in op]
    if fmt == "onnx":
        assert report["graph"]["nodes"] > 500  # the CRF's lattice is in the graph
