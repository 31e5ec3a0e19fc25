"""The export driver (export_model and its Format hooks), the one ExportArchive builder and portable_crf(params=)."""
import json
import os

import numpy as np
import pytest
import tensorflow as tf

from deeplab_keras.crf import CRFParams
from deeplab_keras.export import common, driver, export_model, staging, tflite
from deeplab_keras.export.verify import VerificationError
from tests.conftest import tiny_model


@pytest.fixture(scope="module")
def model():
    import keras
    keras.utils.set_random_seed(4)
    return tiny_model(3, "resnet50")


class _NpzFormat(driver.Format):
    """A format for testing the driver alone: the artifact is the Keras model's outputs in an .npz file, so the
    runtime is numpy; ``scale`` != 1 makes it a broken artifact."""
    name = "npz"
    options = {"scale": 1.0}
    crf_runtime = "tf"
    calls = []

    def destination(self, out, overwrite):
        return staging.file_destination(out, overwrite, "npz file", ".npz")

    def convert(self, model, stage_dir, final):
        self.calls.append("convert")
        self.model = model
        return os.path.join(stage_dir, os.path.basename(final))

    def runners(self, artifact):
        def run(images):
            outputs = common.reference_outputs(self.model, images, "full", self.crf)
            outputs["probabilities"] = outputs["probabilities"] * self.opts["scale"]
            np.savez(artifact, **outputs)
            with np.load(artifact) as data:
                return dict(data)
        return {"numpy": run}

    def warnings(self, verification):
        return [f"agreement {verification['checks']['numpy']['label_agreement']:.3f}"]

    def report_fields(self, artifact):
        return {"scale": self.opts["scale"]}

    def close(self):
        self.calls.append("close")


@pytest.fixture
def npz_format(monkeypatch):
    monkeypatch.setitem(driver.FORMATS, "npz", _NpzFormat)
    _NpzFormat.calls = []
    return _NpzFormat


def test_driver_runs_the_hooks_and_publishes(model, npz_format, tmp_path, capsys):
    out = tmp_path / "new" / "m.npz"
    report = export_model(model, "npz", str(out), num_samples=2, verify_size=(33, 41),
                          progress=common.Progress(False))
    assert sorted(os.listdir(out.parent)) == ["m.npz", "m.npz.report.json"]
    assert npz_format.calls == ["convert", "close"]
    assert report["format"] == "npz" and report["scale"] == 1.0 and report["precision"] == "float32"
    assert report["verification"]["passed"] and report["warnings"] == ["agreement 1.000"]
    assert report["created_dirs"] == [str(out.parent)] and report["size_bytes"] == out.stat().st_size
    assert "WARNING: agreement 1.000" in capsys.readouterr().err  # warnings print even when progress is off
    assert json.loads((tmp_path / "new" / "m.npz.report.json").read_text())["artifact"] == str(out)
    with pytest.raises(common.ExportError, match="already exists"):
        export_model(model, "npz", str(out))


def test_driver_failed_verification_leaves_only_the_report(model, npz_format, tmp_path):
    out = tmp_path / "deep" / "m.npz"
    with pytest.raises(VerificationError, match="was not written"):
        export_model(model, "npz", str(out), scale=0.5, num_samples=1, verify_size=(33, 33))
    assert npz_format.calls == ["convert", "close"]
    assert sorted(os.listdir(tmp_path / "deep")) == ["m.npz.report.json"]  # no artifact, no staging folder
    assert json.loads((tmp_path / "deep" / "m.npz.report.json").read_text())["artifact"] is None


def test_driver_refuses_unknown_formats_and_options_before_writing(model, tmp_path):
    with pytest.raises(common.ExportError, match=r"format must be one of \['onnx', 'saved_model', 'tflite'\]"):
        export_model(model, "coreml", str(tmp_path / "m.mlmodel"))
    with pytest.raises(common.ExportError, match="option 'int8_io' does not apply to format 'onnx'"):
        export_model(model, "onnx", str(tmp_path / "m.onnx"), quantize="int8", int8_io=True)
    with pytest.raises(common.ExportError, match="--quantize for --format onnx must be one of"):
        export_model(model, "onnx", str(tmp_path / "m.onnx"), quantize="float16")
    with pytest.raises(common.ExportError, match="aspp_head must be one of"):
        export_model(model, "saved_model", str(tmp_path / "sm"), aspp_head="wide")
    with pytest.raises(common.ExportError, match="option 'opset' does not apply to format 'saved_model'"):
        export_model(model, "saved_model", str(tmp_path / "sm"), opset=13)
    assert not list(tmp_path.iterdir())


def test_one_archive_builder_stores_each_weight_once(model, tmp_path):
    """TFLite's intermediate SavedModel comes from common.serving_archive without track(): weights once."""
    path = str(tmp_path / "float_saved_model")
    tflite._write_float_saved_model(model, path, (33, 33), "full", None)
    variables = staging.path_size(os.path.join(path, "variables"))
    weight_bytes = sum(np.asarray(w).nbytes for w in model.weights)
    assert weight_bytes <= variables <= 1.05 * weight_bytes, (variables, weight_bytes)


def test_portable_crf_takes_crf_params():
    params = CRFParams(iterations=3, bilateral_weight=5.0, gaussian_xy_std=2.0)
    hook = common.portable_crf(params=params)
    assert hook.params == params
    assert common.portable_crf(params=params, iterations=2).params.iterations == 2
    assert common.portable_crf(iterations=3, bilateral_weight=5.0, gaussian_xy_std=2.0).params == params
    assert common.portable_crf().params == CRFParams()
    config = hook.for_runtime("onnx").config
    assert config["bilateral_weight"] == 5.0 and config["runtime"] == "onnx" and config["splat"] == "cumsum"
    with pytest.raises(ValueError, match="bilateral_xy_std"):
        common.portable_crf(params=params, bilateral_xy_std=-1.0)
    with pytest.raises(ValueError, match=r"unknown crf key\(s\)"):
        common.portable_crf(bilateral_sigma=3.0)


def test_portable_crf_params_reach_the_graph():
    from deeplab_keras.crf.portable import dense_crf_portable

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (1, 17, 19, 3)).astype(np.float32)
    probabilities = tf.nn.softmax(rng.normal(0, 2, (1, 17, 19, 3)).astype(np.float32))
    params = CRFParams(iterations=3, bilateral_weight=6.0, bilateral_rgb_std=10.0)
    got = common.portable_crf(params=params).for_runtime("tf")(probabilities, tf.constant(images))
    want = dense_crf_portable(probabilities, images.astype(np.uint8), params, splat="scatter")
    np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-6)
    default = common.portable_crf(iterations=3).for_runtime("tf")(probabilities, tf.constant(images))
    assert np.abs(default.numpy() - got.numpy()).max() > 1e-3  # the parameters change the result
