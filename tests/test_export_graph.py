"""The serving graph (deeplab_keras/graph_rewrite.py: native dilation, folded batch norm, fused ASPP head), the
float32 tolerance derived from the model's own sensitivity, and int8 onnxruntime exports."""
import json

import keras
import numpy as np
import onnx
import pytest
import tensorflow as tf

from deeplab_keras import _keras_compat
from deeplab_keras.cli import export_main
from deeplab_keras import graph_rewrite as graph
from deeplab_keras.export import onnx as onnx_export, serving, verify
from deeplab_keras.export.verify import (FLOAT32_MAX_DIFF, SENSITIVITY_MARGIN, Tolerance, run_checks,
                                        synthetic_images)
from tests.conftest import tiny_model
from tests.test_export_cli import TINY_ARGS

SIZE = (49, 65)


@pytest.fixture(scope="module")
def model():
    keras.utils.set_random_seed(5)
    return tiny_model(4, "resnet50")


@pytest.mark.parametrize("head", graph.ASPP_HEADS)
def test_rewrite_computes_the_same_logits_with_native_ops(model, head):
    x = tf.constant(synthetic_images(SIZE, 2, seed=1), tf.float32)
    reference = model(x).numpy()
    rewrite = graph.GraphRewrite(model, aspp_head=head)

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32)])
    def serve(images):
        with rewrite:
            return model(images)

    got = serve(x).numpy()
    np.testing.assert_allclose(got, reference, atol=1e-4 * np.abs(reference).max())
    ops = {op.type for op in serve.get_concrete_function().graph.get_operations()}
    assert not {"SpaceToBatchND", "BatchToSpaceND", "FusedBatchNormV3", "Rsqrt"} & ops, ops
    layers = _keras_compat.flatten_layers(model)
    bns = [layer for layer in layers if isinstance(layer, keras.layers.BatchNormalization)]
    dilated = [layer for layer in layers if isinstance(layer, keras.layers.Conv2D) and max(layer.dilation_rate) > 1]
    assert rewrite.stats["folded_batch_norms"] == len(bns) > 0
    assert rewrite.stats["aspp_head"] == head and ("MatMul" in ops) == (head == "fused")
    assert rewrite.stats["native_dilated_convs"] == len(dilated) - (4 if head == "fused" else 0)  # 2 ASPP-S rates x2
    assert not any("call" in vars(layer) for layer in layers)  # patched only while tracing
    np.testing.assert_array_equal(model(x).numpy(), reference)


def test_tolerance_derived_from_the_models_float32_sensitivity(tmp_path):
    """A tiny network whose logits are 100x larger (ASPP weights scaled): onnxruntime's float32 logits differ from
    Keras' by more than the fixed 1e-4, the derived tolerance (4x the measured sensitivity) passes them, and a
    misaligned input (one pixel) still fails."""
    keras.utils.set_random_seed(0)
    net = tiny_model(3, "resnet50")
    for layer in _keras_compat.flatten_layers(net):
        if layer.name.startswith("aspp_r"):
            layer.kernel.assign(100 * layer.kernel.numpy())
            layer.bias.assign(100 * layer.bias.numpy())
    images = synthetic_images(SIZE, 2, seed=0)
    weights = [w.numpy() for w in net.weights]
    sensitivity = verify.float32_sensitivity(net, images, "logits")
    assert all(np.array_equal(w, v.numpy()) for w, v in zip(weights, net.weights))  # restored exactly
    assert sensitivity == verify.float32_sensitivity(net, images, "logits")  # seeded

    report = onnx_export.export_onnx(net, str(tmp_path / "m.onnx"), input_size=SIZE, outputs="logits",
                                     num_samples=2)
    verification = report["verification"]
    derivation = verification["tolerance_derivation"]
    assert verification["passed"] and derivation["sensitivity"] == sensitivity
    assert derivation["max_abs_diff"] == pytest.approx(SENSITIVITY_MARGIN * sensitivity)
    assert derivation["max_abs_diff"] > FLOAT32_MAX_DIFF
    assert verification["checks"]["onnxruntime"]["max_abs_diff"] > FLOAT32_MAX_DIFF  # the fixed 1e-4 refused it

    reference = serving.reference_outputs(net, images, "logits")
    shifted = serving.reference_outputs(net, np.roll(images, 1, axis=2), "logits")
    result = run_checks([("shifted", reference, shifted)], Tolerance(max_abs_diff=derivation["max_abs_diff"]))
    assert not result["passed"] and "max |diff|" in result["failures"][0]


def test_onnx_int8_from_the_command_line(tmp_path, voc_samples_dir):
    """deeplab-export --format onnx --quantize int8 --data DIR: a QDQ graph calibrated on the folder, verified by
    label agreement against float32 (reported), every atrous convolution one dilated Conv."""
    out = tmp_path / "q.onnx"
    code = export_main(TINY_ARGS + ["--format", "onnx", "--quantize", "int8", "--input-size", *map(str, SIZE),
                                    "--data", str(voc_samples_dir / "VOC2012"), "--num-samples", "2",
                                    "--num-calibration", "3", "--out", str(out)])
    assert code == 0
    report = json.loads(out.with_name("q.onnx.report.json").read_text())
    assert report["precision"] == "int8" and report["quantize"] == "int8" and not report["warnings"]
    assert report["calibration"].endswith("VOC2012") and report["num_calibration_images"] == 3
    check = report["verification"]["checks"]["onnxruntime"]
    assert report["verification"]["passed"] and 0.5 < check["label_agreement"] <= 1.0
    by_op = report["graph"]["by_op"]
    assert by_op["QuantizeLinear"] > 0 and by_op["DequantizeLinear"] > by_op["Conv"] > 0
    assert report["graph"]["dilated_convs_single_node"]
    onnx.checker.check_model(onnx.load(str(out)))
