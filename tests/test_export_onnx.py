"""ONNX export: tf2onnx conversion, onnxruntime verification, dynamic batch, dilated Conv nodes at any H, W."""
import json
import os

import keras
import numpy as np
import onnx
import pytest

from deeplab_keras import _keras_compat
from deeplab_keras.export import ExportError, serving
from deeplab_keras.export import onnx as onnx_export
from deeplab_keras.export.verify import VerificationError, synthetic_images
from deeplab_keras.weights import is_float32
from tests.conftest import tiny_model


@pytest.fixture(scope="module")
def model():
    keras.utils.set_random_seed(3)
    return tiny_model(3, "resnet50")


def _dilated_keras_convs(net):
    return sum(1 for layer in _keras_compat.flatten_layers(net) if isinstance(layer, keras.layers.Conv2D)
               and max(layer.dilation_rate) > 1)


@pytest.fixture(scope="module")
def static(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx") / "static.onnx"
    return path, onnx_export.export_onnx(model, str(path), input_size=(65, 81), num_samples=2)


def test_dynamic_export_runs_any_batch_and_size(model, tmp_path, voc_samples_dir, static):
    path = tmp_path / "dyn.onnx"
    report = onnx_export.export_onnx(model, str(path), sample_dir=str(voc_samples_dir / "VOC2012"),
                                     num_samples=3, verify_size=(65, 81))
    check = report["verification"]["checks"]["onnxruntime"]
    assert report["verification"]["passed"] and check["max_abs_diff"] <= 1e-4 and check["label_agreement"] >= 0.999
    assert report["opset"] == 17 and report["input_size"] is None
    assert sorted(os.listdir(tmp_path)) == ["dyn.onnx", "dyn.onnx.report.json"]
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    assert [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [17]
    session = onnx_export.make_session(str(path))
    assert [d.dim_param != "" or d.dim_value == 0 for d in proto.graph.input[0].type.tensor_type.shape.dim][:3] == \
        [True, True, True]  # N, H, W symbolic
    for batch, size in [(3, (50, 70)), (1, (33, 97))]:
        images = synthetic_images(size, batch, seed=batch)
        got, ref = onnx_export.run_onnx(session, images), serving.reference_outputs(model, images)
        assert got["labels"].dtype == np.int32 and got["labels"].shape == (batch,) + size
        np.testing.assert_allclose(got["probabilities"], ref["probabilities"], atol=1e-4)
    # Dynamic H, W: the serving graph traces native dilated convolutions (deeplab_keras.graph_rewrite), so the atrous
    # convs are single dilated Conv nodes as at a static size (no SpaceToDepth/DepthToSpace), with batch norm folded
    # into them.
    stats, static_stats = report["graph"], static[1]["graph"]
    assert stats["dilated_convs_single_node"] and stats["dilated_conv_nodes"] == _dilated_keras_convs(model) > 0
    assert report["graph_rewrites"]["folded_batch_norms"] == stats["conv_nodes"] - 4  # all but the ASPP's 4 convs
    assert not {"Mul", "BatchNormalization"} & set(stats["by_op"])
    assert stats["nodes"] < 1.5 * static_stats["nodes"]


def test_static_size_gives_single_dilated_conv_nodes(model, static):
    path, report = static
    stats = report["graph"]
    assert report["verification"]["passed"] and report["input_size"] == [65, 81]
    assert stats["dilated_convs_single_node"] and stats["space_to_depth_nodes"] == 0
    assert stats["dilated_conv_nodes"] == _dilated_keras_convs(model) > 0
    softmax = [n for n in onnx.load(str(path)).graph.node if n.op_type == "Softmax"]
    assert [onnx.helper.get_attribute_value(a) for n in softmax for a in n.attribute if a.name == "axis"] == [-1]
    session = onnx_export.make_session(str(path))
    for batch in (1, 2):  # batch stays dynamic
        images = synthetic_images((65, 81), batch, seed=10 + batch)
        got, ref = onnx_export.run_onnx(session, images), serving.reference_outputs(model, images)
        np.testing.assert_allclose(got["probabilities"], ref["probabilities"], atol=1e-4)


def test_logits_resize_is_corner_aligned(static):
    """tf2onnx carries inference.upsample_logits (ResizeBilinear, align_corners) as an align_corners Resize."""
    path, _ = static
    resizes = [n for n in onnx.load(str(path)).graph.node if n.op_type == "Resize"]
    assert resizes
    for node in resizes:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["coordinate_transformation_mode"] == b"align_corners" and attrs["mode"] == b"linear"


def test_opset_13_and_logits(model, tmp_path):
    path = tmp_path / "o13.onnx"
    report = onnx_export.export_onnx(model, str(path), opset=13, input_size=(33, 41), outputs="logits",
                                     num_samples=1)
    assert report["verification"]["passed"] and report["output_names"] == ["logits"]
    assert [o.version for o in onnx.load(str(path)).opset_import if o.domain in ("", "ai.onnx")] == [13]
    out = onnx_export.run_onnx(onnx_export.make_session(str(path)), synthetic_images((33, 41), 1))
    assert out["logits"].shape == (1, 5, 6, 3)
    with pytest.raises(ExportError, match="opset"):
        onnx_export.export_onnx(model, str(tmp_path / "o12.onnx"), opset=12)


def test_nan_weights_are_caught_and_nothing_is_published(tmp_path):
    broken = tiny_model(3, "resnet50")
    kernel = broken.weights[0]
    kernel.assign(np.full(kernel.shape, np.nan, np.float32))
    with pytest.raises(VerificationError, match="NaN"):
        onnx_export.export_onnx(broken, str(tmp_path / "m.onnx"), input_size=(33, 33), num_samples=1)
    assert sorted(os.listdir(tmp_path)) == ["m.onnx.report.json"]
    report = json.loads((tmp_path / "m.onnx.report.json").read_text())
    assert report["verification"]["passed"] is False and report["artifact"] is None


def test_mixed_precision_model_exports_as_float32(tmp_path):
    keras.config.set_dtype_policy("mixed_float16")
    try:
        mixed = tiny_model(3, "resnet50")
    finally:
        keras.config.set_dtype_policy("float32")
    assert not is_float32(mixed)
    path = tmp_path / "m.onnx"
    report = onnx_export.export_onnx(mixed, str(path), input_size=(33, 41), num_samples=1)
    assert report["verification"]["passed"] and report["precision"] == "float32"
    proto = onnx.load(str(path))
    float_types = {t.data_type for t in proto.graph.initializer if t.data_type in (1, 10, 16)}
    assert float_types == {onnx.TensorProto.FLOAT}  # no float16/bfloat16 weights
    images = synthetic_images((33, 41), 1)
    got = onnx_export.run_onnx(onnx_export.make_session(str(path)), images)
    np.testing.assert_allclose(got["probabilities"], serving.reference_outputs(mixed, images)["probabilities"],
                               atol=2e-2)  # the mixed model computes in float16
