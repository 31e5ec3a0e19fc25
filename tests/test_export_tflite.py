"""TFLite export: LiteRT builtins only, float32 / float16 / dynamic-range / int8, static and dynamic sizes."""
import os

import numpy as np
import pytest
import tensorflow as tf

from deeplab_keras import _keras_compat
from deeplab_keras.export import ExportError, serving, tflite
from deeplab_keras.export.verify import TOLERANCES, run_checks, synthetic_images
from tests.conftest import tiny_model

BANNED = ("FLEX", "CUSTOM")  # Select-TF (Flex) ops and custom ops: the LiteRT interpreter cannot run them


def _builtin_only(ops):
    assert ops and not [op for op in ops if any(b in op.upper() for b in BANNED)], ops


@pytest.fixture(scope="module")
def model():
    import keras
    keras.utils.set_random_seed(2)
    return tiny_model(3, "resnet50")


def train_tiny(num_classes, size, steps, batch_size=8, seed=0, data_seed=5, num_examples=48):
    """A tiny DeepLab (``tiny_model``) trained briefly with Adam on synthetic shapes; BN statistics set from the
    data (real decision boundaries, for tests that need a trained model). Returns ``(net, images)``."""
    import keras
    from deeplab_keras.data.synthetic import generate_example

    keras.utils.set_random_seed(seed)
    net = tiny_model(num_classes, "resnet50")
    examples = [generate_example(i, size, num_classes, seed=data_seed) for i in range(num_examples)]
    x = np.stack([e[0] for e in examples]).astype(np.float32)
    y = np.stack([e[1] for e in examples]).astype(np.int32)
    optimizer = keras.optimizers.Adam(3e-3)

    @tf.function
    def step(images, labels):
        with tf.GradientTape() as tape:
            logits = serving.upsample_logits(net(images, training=True), tf.shape(images)[1:3])
            loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True))
        grads = tape.gradient(loss, net.trainable_variables)
        optimizer.apply_gradients(zip(grads, net.trainable_variables))
        return loss

    rng = np.random.RandomState(seed)
    for _ in range(steps):
        idx = rng.randint(0, len(x), batch_size)
        step(x[idx], y[idx])
    # A few steps are too few for BN's moving averages (momentum 0.99): set them to the statistics of the data.
    norms = [layer for layer in _keras_compat.flatten_layers(net)
             if isinstance(layer, keras.layers.BatchNormalization)]
    for layer in norms:
        layer.momentum = 0.0
    net(x, training=True)
    for layer in norms:
        layer.momentum = 0.99
    return net, x


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny DeepLab trained briefly on synthetic shapes (real decision boundaries, for int8 agreement)."""
    from deeplab_keras.data.synthetic import generate_example, write_synthetic_folder

    net, _ = train_tiny(3, (65, 65), steps=100)
    held = [generate_example(i, (65, 65), 3, seed=11) for i in range(6)]
    predicted = serving.reference_outputs(net, np.stack([e[0] for e in held]))["labels"]
    accuracy = np.mean(predicted == np.stack([e[1] for e in held]))
    assert accuracy > 0.9, f"the tiny model did not train (held-out pixel accuracy {accuracy:.3f})"
    calibration = write_synthetic_folder(tmp_path_factory.mktemp("calib") / "data", 16, (65, 65), 3, seed=7)
    held_out = write_synthetic_folder(tmp_path_factory.mktemp("heldout") / "data", 6, (65, 65), 3, seed=11)
    return net, str(calibration), str(held_out)


@pytest.fixture(scope="module")
def fp32_static(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("tfl") / "static.tflite"
    return path, tflite.export_tflite(model, str(path), input_size=(65, 65), num_samples=2)


def test_fp32_dynamic_size(model, tmp_path, voc_samples_dir):
    path = tmp_path / "m.tflite"
    report = tflite.export_tflite(model, str(path), sample_dir=str(voc_samples_dir / "VOC2012"), num_samples=3,
                                  verify_size=(65, 81))
    assert report["verification"]["passed"] and report["input_size"] is None
    check = report["verification"]["checks"]["tflite"]
    assert check["max_abs_diff"] <= 1e-4 and check["label_agreement"] >= 0.999
    assert sorted(os.listdir(tmp_path)) == ["m.tflite", "m.tflite.report.json"]
    _builtin_only(report["ops"])
    # dynamic H, W: the serving graph's native dilated convolutions (deeplab_keras/graph_rewrite.py) stay single
    # CONV_2D ops
    assert "SPACE_TO_BATCH_ND" not in report["ops"] and report["graph_rewrites"]["native_dilated_convs"] > 0
    runner = tflite.TFLiteRunner(str(path))
    assert runner.input_details["dtype"] == np.float32
    for size in [(50, 70), (33, 97)]:  # other sizes than the verification one
        images = synthetic_images(size, 2, seed=3)
        got, ref = runner(images), serving.reference_outputs(model, images)
        assert got["labels"].shape == (2,) + size and got["probabilities"].shape == (2,) + size + (3,)
        np.testing.assert_allclose(got["probabilities"], ref["probabilities"], atol=1e-4)


def test_fp32_static_size_fuses_dilated_convs(fp32_static):
    path, report = fp32_static
    assert report["verification"]["passed"] and report["input_size"] == [65, 65]
    assert report["verification"]["checks"]["tflite"]["max_abs_diff"] <= 1e-4
    _builtin_only(report["ops"])
    assert "SPACE_TO_BATCH_ND" not in report["ops"] and "BATCH_TO_SPACE_ND" not in report["ops"]
    runner = tflite.TFLiteRunner(str(path))
    assert list(runner.input_details["shape"]) == [1, 65, 65, 3]


def test_logits_resize_is_corner_aligned(fp32_static):
    """LiteRT's builtin RESIZE_BILINEAR carries inference.upsample_logits' align_corners (no half-pixel centres)."""
    from tensorflow.lite.python import schema_py_generated as schema

    path, _ = fp32_static
    flat = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(path.read_bytes(), 0))
    codes = [max(c.builtinCode, c.deprecatedBuiltinCode) for c in flat.operatorCodes]
    options = [op.builtinOptions for graph in flat.subgraphs for op in graph.operators
               if codes[op.opcodeIndex] == schema.BuiltinOperator.RESIZE_BILINEAR]
    assert options and all(o.alignCorners and not o.halfPixelCenters for o in options)


def test_float16_logits(model, tmp_path, fp32_static):
    path = tmp_path / "fp16.tflite"
    report = tflite.export_tflite(model, str(path), quantize="float16", input_size=(65, 65), outputs="logits",
                                  num_samples=2)
    check = report["verification"]["checks"]["tflite"]
    assert report["verification"]["passed"] and check["compared"] == "logits"
    assert check["label_agreement"] >= 0.99
    assert report["output_names"] == ["logits"]
    out = tflite.TFLiteRunner(str(path))(synthetic_images((65, 65), 1))
    assert out["logits"].shape == (1, 9, 9, 3)  # output stride 8
    assert report["size_bytes"] < 0.65 * fp32_static[1]["size_bytes"]  # weights stored in float16


def test_dynamic_range_reports_agreement(model, tmp_path, fp32_static):
    report = tflite.export_tflite(model, str(tmp_path / "dyn.tflite"), quantize="dynamic", input_size=(65, 65),
                                  num_samples=2)
    check = report["verification"]["checks"]["tflite"]
    assert report["precision"] == "dynamic" and check["finite"]
    assert 0.0 <= check["miou_vs_keras"] <= 1.0 and 0.0 <= check["label_agreement"] <= 1.0
    assert report["size_bytes"] < 0.5 * fp32_static[1]["size_bytes"]
    _builtin_only(report["ops"])


@pytest.mark.slow
def test_int8_on_trained_model(trained, tmp_path):
    net, calibration, held_out = trained
    report = tflite.export_tflite(net, str(tmp_path / "int8.tflite"), quantize="int8", input_size=(65, 65),
                                  representative=calibration, sample_dir=held_out, num_samples=6)
    check = report["verification"]["checks"]["tflite"]
    assert report["full_integer"] is True and check["finite"]
    assert check["label_agreement"] >= 0.95, check
    assert check["miou_vs_keras"] >= 0.85, check
    _builtin_only(report["ops"])

    io_path = tmp_path / "int8io.tflite"
    report = tflite.export_tflite(net, str(io_path), quantize="int8", int8_io=True, input_size=(65, 65),
                                  representative=calibration, sample_dir=held_out, num_samples=6)
    runner = tflite.TFLiteRunner(str(io_path))
    assert runner.input_details["dtype"] == np.uint8
    assert runner.output_details["probabilities"]["dtype"] == np.uint8
    assert runner.output_details["labels"]["dtype"] == np.int32
    assert report["verification"]["checks"]["tflite"]["label_agreement"] >= 0.95


def test_verification_catches_the_tf_saved_model_save_pitfall(model, tmp_path):
    """TF 2.21 / Keras 3: tf.saved_model.save of a Keras model converts to a .tflite with garbage weights
    (NaN outputs, no error). The exporters never take that path, and verification flags its result."""
    module = tf.Module()
    module.model = model
    module.serve = tf.function(lambda image: serving.serving_outputs(model, image),
                               input_signature=[tf.TensorSpec([1, 33, 33, 3], tf.float32, name="image")])
    tf.saved_model.save(module, str(tmp_path / "sm"), signatures={"serving_default": module.serve})
    converter = tf.lite.TFLiteConverter.from_saved_model(str(tmp_path / "sm"))
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    images = synthetic_images((33, 33), 1)
    got = tflite.TFLiteRunner(converter.convert())(images)
    result = run_checks([("pitfall", serving.reference_outputs(model, images), got)], TOLERANCES["float32"])
    assert not result["passed"] and "NaN" in result["failures"][0]


def test_bad_requests(model, tmp_path, fp32_static):
    path, _ = fp32_static
    with pytest.raises(ExportError, match="already exists"):
        tflite.export_tflite(model, str(path))
    with pytest.raises(ExportError, match="int8"):
        tflite.export_tflite(model, str(tmp_path / "x.tflite"), int8_io=True)
    with pytest.raises(ExportError, match="quantize"):
        tflite.export_tflite(model, str(tmp_path / "x.tflite"), quantize="int4")
    with pytest.raises(ExportError, match="directory"):
        tflite.export_tflite(model, str(tmp_path))
    assert not list(tmp_path.iterdir())


def test_interrupted_export_leaves_nothing(model, tmp_path, monkeypatch):
    """An export interrupted mid-conversion (Ctrl-C) leaves neither a partial artifact nor temporaries."""
    def interrupted(*args, **kwargs):
        with open(os.path.join(kwargs["workdir"], "partial.bin"), "wb") as f:
            f.write(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(tflite, "convert", interrupted)
    with pytest.raises(KeyboardInterrupt):
        tflite.export_tflite(model, str(tmp_path / "m.tflite"))
    assert not list(tmp_path.iterdir())
