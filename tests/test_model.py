"""DeepLabV2: shapes at every output stride, the paper's parameter counts, keras.applications parity,
ASPP sum, MSC max fusion, ModelConfig, config / .keras round trips (and a
.keras file saved before ModelConfig), the classifier layers, float32 copies and argument errors."""
import dataclasses
import json
import re
import subprocess
import sys

import keras
import numpy as np
import pytest
from keras.applications.resnet import preprocess_input

import deeplab_keras as dk
from deeplab_keras.layers.aspp import ASPP
from deeplab_keras.layers.preprocessing import (DEEPLAB_MEAN_BGR, CaffeInterp, CaffePreprocess, ResizeLike,
                                                 interp_size, resize_aligned)
from deeplab_keras.models.deeplab import CLASSIFIER_PATTERN, logits_size
from deeplab_keras.models.msc import MSC
from deeplab_keras.weights import as_float32, load_model, transfer_backbone_weights
from deeplab_keras.weights.checkpoints import imagenet_reference
from tests.conftest import REPO, TINY, tiny_model

RNG = np.random.RandomState(0)


def images(n, h, w):
    return RNG.uniform(0, 255, (n, h, w, 3)).astype("float32")


@pytest.mark.parametrize("backbone", sorted(TINY))
@pytest.mark.parametrize("output_stride", [8, 16, 32])
def test_logits_size_rule(backbone, output_stride):
    model = tiny_model(5, backbone, output_stride=output_stride)
    for n, h, w in [(1, 33, 33), (2, 65, 98), (3, 50, 44)]:
        out = model(images(n, h, w))
        assert tuple(out.shape) == (n, *model.logits_size(h, w), 5)
        assert out.dtype == "float32" and np.isfinite(np.asarray(out)).all()


def test_logits_size_is_caffes():
    """The sizes the released Caffe nets give (reference logits in ../shared/data/caffe-reference)."""
    assert [logits_size(n, n) for n in (321, 513)] == [(41, 41), (65, 65)]
    assert logits_size(375, 500) == (48, 63)          # ceil(375 / 8) = 47: Caffe's ceil-mode pool1 gives 48
    assert logits_size(366, 500) == (46, 63)
    assert logits_size(366, 500, "vgg16") == (47, 64)
    assert logits_size(320, 320) == (41, 41) and logits_size(513, 513, output_stride=16) == (33, 33)
    model = tiny_model(3, "resnet50")
    assert tuple(model(images(1, 375, 320)).shape) == (1, 48, 41, 3)


def test_caffe_interp_sizes_and_aligned_corners():
    import tensorflow as tf

    assert [interp_size(n, 0.75) for n in (513, 321, 500)] == [385, 241, 373]
    assert [interp_size(n, 0.5) for n in (513, 321, 500)] == [257, 161, 250]
    x = images(2, 17, 23)
    out = CaffeInterp(0.75)(x)
    assert tuple(out.shape) == (2, 13, 16, 3)
    expected = tf.compat.v1.image.resize_bilinear(x, (13, 16), align_corners=True)
    np.testing.assert_allclose(np.asarray(out), np.asarray(expected), atol=1e-3)
    up = resize_aligned(x, (33, 45))   # corners land on corners
    np.testing.assert_allclose(np.asarray(up)[:, [0, -1]][:, :, [0, -1]], x[:, [0, -1]][:, :, [0, -1]], atol=1e-4)
    np.testing.assert_allclose(np.asarray(up), np.asarray(
        tf.compat.v1.image.resize_bilinear(x, (33, 45), align_corners=True)), atol=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("backbone,aspp,expected", [
    ("resnet101", "L", 44.21e6), ("resnet50", "L", 25.14e6), ("vgg16", "largefov", 20.5e6)])
def test_paper_param_counts_and_513_logits(backbone, aspp, expected):
    model = dk.DeepLabV2(num_classes=21, backbone=backbone, aspp=aspp)
    assert abs(model.count_params() - expected) / expected < 0.01
    if backbone == "resnet101":
        backbone_params = sum(int(np.prod(w.shape)) for w in model.network.weights if "aspp" not in w.path)
        assert abs(backbone_params - 42.66e6) / 42.66e6 < 0.01
        head = model.network.get_layer("aspp").count_params()
        assert abs(head - 1.55e6) / 1.55e6 < 0.01
    if backbone == "resnet50":  # 513 -> 65 at output stride 8
        assert tuple(model(np.zeros((1, 513, 513, 3), "float32")).shape) == (1, 65, 65, 21)


@pytest.mark.slow
@pytest.mark.parametrize("backbone", ["resnet50", "resnet101"])
def test_resnet_matches_keras_applications_at_os32(backbone):
    """Same layers and weights as keras.applications. The stems agree where conv1's output size is odd
    (H mod 4 in {1, 2}: 97, 81, 321, 513); elsewhere Caffe's ceil-mode pool1 adds a row (see resnet.py)."""
    reference = imagenet_reference(backbone, weights=None)  # random weights: proves the mapping offline
    model = dk.DeepLabV2(num_classes=21, backbone=backbone, output_stride=32, bn_epsilon=1.001e-5)
    copied = transfer_backbone_weights(model, reference)
    assert len(copied) == sum(1 for layer in reference.layers if layer.weights)
    x = images(2, 97, 81)
    expected = np.asarray(reference(x[..., ::-1] - np.float32(DEEPLAB_MEAN_BGR)))
    features = keras.Model(model.network.input, model.network.get_layer("conv5_block3_out").output)(x)
    assert np.abs(np.asarray(features) - expected).max() <= 1e-4
    x = images(1, 96, 96)   # conv1 gives 48 rows: Caffe's pool1 gives 25, keras.applications' 24
    ours = keras.Model(model.network.input, model.network.get_layer("pool1_pool").output)(x)
    theirs = keras.Model(reference.input, reference.get_layer("pool1_pool").output)(x)
    assert ours.shape[1] == 25 and theirs.shape[1] == 24
    # At output stride 8 the same weights fill the same layers (only strides / dilations differ).
    dense = dk.DeepLabV2(num_classes=21, backbone=backbone, output_stride=8)
    transfer_backbone_weights(dense, reference)
    for layer in reference.layers:
        for a, b in zip(layer.get_weights(),
                        dense.network.get_layer(layer.name).get_weights() if layer.weights else []):
            np.testing.assert_array_equal(a, b)
    assert dense.network.get_layer("conv5_block1_2_conv").dilation_rate == (4, 4)
    assert dense.network.get_layer("conv4_block1_2_conv").dilation_rate == (2, 2)
    assert dense.network.get_layer("conv4_block1_1_conv").strides == (1, 1)


@pytest.mark.slow
def test_vgg16_transfer_and_largefov_decimation():
    reference = imagenet_reference("vgg16", weights=None)
    model = dk.DeepLabV2(num_classes=21, backbone="vgg16", aspp="largefov")
    copied = transfer_backbone_weights(model, reference)
    assert {"block1_conv1", "block5_conv3", "fc6_r12", "fc7_r12"} <= set(copied)
    x = images(1, 224, 224)  # the VGG16 reference with its top takes 224x224 only
    first = keras.Model(model.network.input, model.network.get_layer("block1_conv2").output)(x)
    expected = keras.Model(reference.input, reference.get_layer("block1_conv2").output)(
        x[..., ::-1] - np.float32(DEEPLAB_MEAN_BGR))
    assert np.abs(np.asarray(first) - np.asarray(expected)).max() <= 1e-4
    fc6 = model.network.get_layer("aspp").branches[0][0].get_weights()[0]
    np.testing.assert_array_equal(
        fc6, reference.get_layer("fc1").get_weights()[0].reshape(7, 7, 512, 4096)[::3, ::3, :, ::4])
    assert model.network.get_layer("aspp").branches[0][0].dilation_rate == (12, 12)
    assert model.network.get_layer("block5_conv1").dilation_rate == (2, 2)
    assert model.network.get_layer("block4_pool").strides == (1, 1)
    assert model.pool5a and model.network.get_layer("pool5a").pool_size == (3, 3)
    assert not dk.DeepLabV2(num_classes=21, backbone="vgg16", aspp="L", width_multiplier=0.0625).pool5a


def test_transfer_refuses_mismatched_widths():
    model = tiny_model(3, "resnet50")
    with pytest.raises(ValueError, match="width_multiplier"):
        transfer_backbone_weights(model, keras.applications.ResNet50(include_top=False, weights=None))


def test_preprocessing_is_deeplabs_bgr_minus_mean():
    x = images(2, 9, 7)
    np.testing.assert_allclose(np.asarray(CaffePreprocess()(x)), x[..., ::-1] - np.array([104.008, 116.669, 122.675]),
                               atol=1e-4)
    imagenet = CaffePreprocess(mean_bgr=(103.939, 116.779, 123.68))(x)
    np.testing.assert_allclose(np.asarray(imagenet), preprocess_input(x.copy()), atol=1e-4)


def test_aspp_sums_branch_logits():
    aspp = ASPP(4, (1, 2, 3))
    x = RNG.normal(size=(2, 11, 13, 6)).astype("float32")
    out = np.asarray(aspp(x))
    total = sum(np.asarray(branch[0](x)) for branch in aspp.branches)
    np.testing.assert_allclose(out, total, atol=1e-5)
    assert [b[0].dilation_rate for b in aspp.branches] == [(1, 1), (2, 2), (3, 3)]
    model = tiny_model(3, "resnet50", aspp="S")
    assert model.network.get_layer("aspp").rates == (2, 4, 8, 12)


def test_msc_fuses_by_pixelwise_max():
    model = tiny_model(4, "resnet50", msc_scales=(1.0, 0.75, 0.5))
    x = images(2, 65, 73)
    outs = model.multi_scale_logits(x, training=False)
    assert set(outs) == {"scale_1.0", "scale_0.75", "scale_0.5", "fused"}
    shapes = {tuple(v.shape) for v in outs.values()}
    assert shapes == {(2, 9, 10, 4)}
    assert tuple(model.get_layer("msc_input_0_75")(x).shape) == (2, 49, 55, 3)   # Caffe Interp: (64//4)*3+1
    per_scale = np.stack([np.asarray(outs[k]) for k in ("scale_1.0", "scale_0.75", "scale_0.5")])
    np.testing.assert_allclose(np.asarray(outs["fused"]), per_scale.max(0), atol=1e-6)
    np.testing.assert_allclose(np.asarray(model(x)), per_scale.max(0), atol=1e-5)
    # scale 0.5 really ran the shared network on a half-size input
    half = ResizeLike()([model.network(CaffeInterp(0.5)(x)), outs["scale_1.0"]])
    np.testing.assert_allclose(np.asarray(half), np.asarray(outs["scale_0.5"]), atol=1e-5)


@pytest.mark.parametrize("backbone,extra", [("resnet50", {}), ("resnet101", {"aspp": (3, 5)}),
                                            ("vgg16", {}), ("resnet50", {"msc_scales": (1.0, 0.5)})])
def test_config_and_keras_file_round_trip(tmp_path, backbone, extra):
    model = tiny_model(3, backbone, **extra)
    x = images(2, 49, 57)
    expected = np.asarray(model(x))
    clone = dk.DeepLabV2.from_config(model.get_config())
    assert clone.get_config() == model.get_config()
    assert clone.count_params() == model.count_params()
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    assert isinstance(loaded, dk.DeepLabV2)
    np.testing.assert_array_equal(np.asarray(loaded(x)), expected)
    np.testing.assert_array_equal(np.asarray(load_model(path)(x)), expected)
    # weights=<path> builds a fresh model and fills it from the checkpoint
    from_path = dk.DeepLabV2(num_classes=3, weights=str(path), **{**TINY[backbone], **extra})
    np.testing.assert_array_equal(np.asarray(from_path(x)), expected)


@pytest.mark.parametrize("layer", [ASPP(5, (2, 4), branch_filters=8, dropout=0.3), CaffePreprocess(),
                                   CaffeInterp(0.75), ResizeLike()])
def test_layers_round_trip_config(layer):
    clone = layer.__class__.from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()


def test_run_directory_resolves_latest_checkpoint(tmp_path):
    model = tiny_model(3)
    (tmp_path / "checkpoints").mkdir()
    model.save(tmp_path / "checkpoints" / "ckpt-20.keras")
    other = tiny_model(3)
    other.save(tmp_path / "checkpoints" / "ckpt-100.keras")
    x = images(1, 33, 33)
    np.testing.assert_array_equal(np.asarray(load_model(tmp_path)(x)), np.asarray(other(x)))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "checkpoints" / "nothing")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="model.keras"):
        load_model(empty)


def test_as_float32_copies_a_mixed_precision_model():
    keras.config.set_dtype_policy("mixed_float16")
    try:
        mixed = tiny_model(3)
    finally:
        keras.config.set_dtype_policy("float32")
    assert mixed.network.get_layer("conv1_conv").compute_dtype == "float16"
    x = images(1, 41, 41)
    fp32 = as_float32(mixed)
    assert all(w.dtype == "float32" for w in fp32.weights)
    assert fp32.network.get_layer("conv1_conv").compute_dtype == "float32"
    for a, b in zip(mixed.get_weights(), fp32.get_weights()):
        np.testing.assert_array_equal(a, b)
    out_mixed, out_fp32 = np.asarray(mixed(x)), np.asarray(fp32(x))
    assert out_mixed.dtype == np.float32  # the logits layer is float32 under mixed precision
    assert np.abs(out_mixed - out_fp32).max() < 0.05 * (np.abs(out_fp32).max() + 1)


@pytest.mark.parametrize("kwargs,match", [
    (dict(backbone="resnet18"), "backbone"), (dict(output_stride=4), "output_stride"),
    (dict(aspp=()), "aspp"), (dict(aspp="XL"), "aspp"), (dict(num_classes=0), "num_classes"),
    (dict(msc_scales=(0.5, 0.75)), "msc_scales"), (dict(aspp="largefov"), "largefov"),
    (dict(stage_blocks=(1, 1)), "stage_blocks"), (dict(width_multiplier=0), "width_multiplier"),
    (dict(msc_scales=(1.0, 0.7071)), "scale"), (dict(pool5a=True), "pool5a"), (dict(pool5a="yes"), "pool5a"),
    (dict(dropout=1.0), "dropout"), (dict(bn_epsilon=0), "bn_epsilon"), (dict(num_classes=True), "num_classes"),
    (dict(msc_scales="1.0"), "msc_scales"), (dict(stage_blocks=(1, 1, 1, 1.5)), "stage_blocks"),
])
def test_bad_arguments_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        dk.DeepLabV2(**{"num_classes": 3, "backbone": "resnet50", **kwargs})
    with pytest.raises(ValueError, match=match):
        dk.ModelConfig(**{"num_classes": 3, "backbone": "resnet50", **kwargs})


def test_wrong_input_shape_names_the_shape_not_the_values():
    model = tiny_model(3)
    with pytest.raises(ValueError, match=r"got shape \(33, 33, 3\) \(add a batch axis") as info:
        model(np.zeros((33, 33, 3), "float32"))
    assert len(str(info.value)) < 200
    with pytest.raises(ValueError, match=r"\[N, H, W, 3\]; got shape \(1, 40, 40, 4\)"):
        model(np.zeros((1, 40, 40, 4), "float32"))


def test_model_config_is_the_models_description():
    config = dk.ModelConfig(num_classes=3, msc_scales=[1, 0.5], stage_blocks=[1, 1, 1, 1], width_multiplier=0.125,
                            backbone="resnet50", aspp=[3, 5])
    assert config.msc_scales == (1.0, 0.5) and config.stage_blocks == (1, 1, 1, 1) and config.aspp == (3, 5)
    assert hash(config) == hash(dk.ModelConfig.from_dict(config.to_dict()))
    plain = json.loads(json.dumps(config.to_dict()))            # JSON / YAML types only
    assert plain == config.to_dict() and plain["aspp"] == [3, 5] and dk.ModelConfig.from_dict(plain) == config
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.num_classes = 4
    with pytest.raises(ValueError, match=r"unknown model key\(s\) \['classes'\]; valid keys: .*'num_classes'"):
        dk.ModelConfig.from_dict({"classes": 3})
    assert config.replace(num_classes=5).num_classes == 5
    with pytest.raises(ValueError, match="num_classes"):
        config.replace(num_classes=-1)
    # one config, three ways to a model: build(), config=, keyword arguments; get_config is the config's dict
    model = config.build()
    assert isinstance(model, dk.DeepLabV2) and model.config == config
    assert model.get_config() == {"name": "deeplab_v2", "trainable": True, **config.to_dict()}
    same = dk.DeepLabV2(**{k: v for k, v in config.to_dict().items()})
    assert same.get_config() == model.get_config() and dk.DeepLabV2(config=config).config == config
    assert dk.DeepLabV2.from_config(model.get_config()).config == config
    assert (model.num_classes, model.rates, model.msc_scales, model.pool5a) == (3, (3, 5), (1.0, 0.5), False)
    with pytest.raises(ValueError, match="either config=ModelConfig"):
        dk.DeepLabV2(num_classes=4, config=config)
    largefov = dk.ModelConfig(backbone="vgg16", aspp="largefov")
    assert largefov.pool5a is None and largefov.use_pool5a and not dk.ModelConfig(backbone="vgg16").use_pool5a


def test_model_config_imports_no_keras():
    """models/config.py, config_base.py and architecture.py are standard library only: training configs and CLIs
    read them on any backend (the packages stubbed, so that only these modules run)."""
    code = ("import sys, types\n"
            "for name, folder in (('deeplab_keras', %r), ('deeplab_keras.models', %r)):\n"
            "    sys.modules[name] = types.ModuleType(name); sys.modules[name].__path__ = [folder]\n"
            "from deeplab_keras.models.config import ModelConfig\n"
            "print(ModelConfig(backbone='vgg16').rates, sorted(k for k in sys.modules "
            "if k.split('.')[0] in ('keras', 'tensorflow', 'jax', 'numpy', 'deeplab_keras')))"
            ) % (str(REPO / "deeplab_keras"), str(REPO / "deeplab_keras" / "models"))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == ("(6, 12, 18, 24) ['deeplab_keras', 'deeplab_keras.architecture', "
                           "'deeplab_keras.config_base', 'deeplab_keras.models', 'deeplab_keras.models.config']")


def test_keras_file_saved_before_model_config_loads():
    """A .keras written by b7262a1 (flat get_config, pool5a a bool; tiny ResNet-50, MSC 1/0.5, random weights
    and BN statistics) loads into the same layers: its logits are the ones saved with it."""
    model = load_model(REPO / "tests" / "data" / "deeplabv2_b7262a1_tiny.keras")
    assert model.config == dk.ModelConfig(3, "resnet50", msc_scales=(1.0, 0.5), width_multiplier=0.0625,
                                          stage_blocks=(1, 1, 1, 1), pool5a=False)
    x = np.random.RandomState(0).uniform(0, 255, (1, 49, 49, 3)).astype("float32")
    expected = np.load(REPO / "tests" / "data" / "deeplabv2_b7262a1_tiny_logits.npy")
    np.testing.assert_allclose(np.asarray(model(x)), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("backbone,extra,expected", [
    ("resnet50", {}, [f"aspp_r{r}_conv/{w}" for r in (6, 12, 18, 24) for w in ("kernel", "bias")]),
    ("vgg16", {}, ["fc8_r12/kernel", "fc8_r12/bias"]),
    ("vgg16", {"aspp": "L"}, [f"fc8_r{r}/{w}" for r in (6, 12, 18, 24) for w in ("kernel", "bias")])])
def test_classifier_variables_are_the_lr_mult_10_layers(backbone, extra, expected):
    """The released solvers train the classifier at 10x: ResNet's ASPP convs, VGG-16's fc8 (not fc6 / fc7)."""
    model = tiny_model(3, backbone, **extra)
    assert [v.path.split("aspp/")[-1] for v in model.classifier_variables] == expected
    matched = [v.path for v in model.trainable_variables if re.search(CLASSIFIER_PATTERN, v.path)]
    assert matched == [v.path for v in model.classifier_variables]
    if backbone == "vgg16":
        assert not any("fc6" in p or "fc7" in p for p in matched)
        assert any("fc6" in v.path for v in model.trainable_variables)


def test_msc_wraps_any_single_scale_network():
    """MSC(network, scales) on a network that is not DeepLab: per-scale logits at the scale-1 size, max fused."""
    inputs = keras.Input((None, None, 3))
    network = keras.Model(inputs, keras.layers.Conv2D(2, 3, strides=2, padding="same")(inputs))
    msc = MSC(network, (1.0, 0.5))
    x = images(1, 33, 41)
    out = msc(x)
    assert sorted(out) == ["fused", "scale_0.5", "scale_1.0"]
    np.testing.assert_allclose(np.asarray(out["scale_1.0"]), np.asarray(network(x)), atol=1e-6)
    half = resize_aligned(network(CaffeInterp(0.5)(x)), (17, 21))
    np.testing.assert_allclose(np.asarray(out["scale_0.5"]), np.asarray(half), atol=1e-5)
    np.testing.assert_allclose(np.asarray(out["fused"]), np.maximum(out["scale_1.0"], half), atol=1e-5)
    single = MSC(network)(x)
    assert sorted(single) == ["fused", "scale_1.0"] and single["fused"] is single["scale_1.0"]
