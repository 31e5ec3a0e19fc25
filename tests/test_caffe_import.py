"""Caffe importer: released-format files written by ../shared/tools/make_caffemodel.py against the PyTorch-port
reference logits (../shared/data/caffe-reference), the variants of the released files (legacy blobs, MSC copies,
VGG pool5a, ResNet-50 names, VGG-ASPP, COCO / ImageNet inits, V1 files) and every bad-input case."""
import collections
import os
import subprocess
import sys
import zipfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from deeplab_keras.weights import caffe, convert
from deeplab_keras.weights.caffe import CaffeModelError, caffemodel_config, load_caffemodel, read_caffemodel
from deeplab_keras.weights.download import _sha256_file
from tests import caffe_writer as cw
from tests.conftest import REPO, shared_path, tiny_model

SHARED = REPO.parent / "shared"
REFERENCE = SHARED / "data" / "caffe-reference"
MAKE = SHARED / "tools" / "make_caffemodel.py"
# name: (make_caffemodel.py arguments, sha256 from caffe-reference/README.md or None)
FILES = {
    "resnet101": (["resnet101"], "6f7494a232a8e6a57ab932c6d23c7e9806492361831eb8e8ce5bcb645dceb588"),
    "resnet101_legacy": (["resnet101", "--legacy-blobs"],
                         "a0a1ebfc39b236aaabbee0cb34e0da92b8d7c797f102c0fd8afe42c7c5f98c42"),
    "vgg16": (["vgg16_largefov"], "ccbdf9078ec85843f071b1cdae91b9591c2d185a6935c2e4e041873928ec78e0"),
    "vgg16_nopool5a": (["vgg16_largefov", "--no-pool5a"],
                       "c5a8c336de4c42e24eb3c2ec5e9872b415e9cdbc61288946c3e7f63121eac0d5"),
    "vgg16_msc": (["vgg16_largefov", "--msc-branches"], None),
}
PAD_COLOUR = (122.675, 116.669, 104.008)  # DeepLab's mean as RGB: zero after mean subtraction


@pytest.fixture(scope="session")
def caffemodels(tmp_path_factory):
    """The generated files (about 8 s on 2 cores), their sha256 checked against the reference README."""
    shared_path("tools", "make_caffemodel.py")  # skips without ../shared
    folder = tmp_path_factory.mktemp("caffemodels")

    def make(item):
        name, (args, _) = item
        path = folder / f"{name}.caffemodel"
        subprocess.run([sys.executable, str(MAKE), args[0], str(path)] + args[1:], check=True,
                       capture_output=True, timeout=300)
        return name, path

    with ThreadPoolExecutor(2) as pool:
        paths = dict(pool.map(make, FILES.items()))
    for name, (_, digest) in FILES.items():
        if digest is not None:
            assert _sha256_file(paths[name]) == digest, f"make_caffemodel.py's {name} drifted: the references are stale"
    return paths


@pytest.fixture(scope="session")
def reference():
    shared_path("data", "caffe-reference", "reference_logits.npz")  # skips without ../shared
    with np.load(REFERENCE / "reference_logits.npz") as z:
        return {k: z[k] for k in z.files}


def _input(reference, image, kind):
    rgb = reference[f"input/{image}/{'r321' if kind == 'r321' else 'native'}"].astype(np.float32)
    if kind != "pad513":
        return rgb[None]
    x = np.empty((513, 513, 3), np.float32)
    x[:] = PAD_COLOUR
    x[:rgb.shape[0], :rgb.shape[1]] = rgb
    return x[None]


def _assert_matches(got, expected, rel=1e-3, agreement=0.999):
    got = np.asarray(got)
    assert got.shape == expected.shape
    diff = np.abs(got - expected).max()
    assert diff <= rel * np.abs(expected).max(), (diff, np.abs(expected).max())
    assert np.mean(got.argmax(-1) == expected.argmax(-1)) >= agreement


@pytest.fixture(scope="session")
def resnet(caffemodels):
    """The generated ResNet-101 converted once, as the released MSC model (scales 1, 0.75, 0.5)."""
    return convert.convert(caffemodels["resnet101"], backbone="resnet101", num_classes=21, msc_scales=(1.0, 0.75, 0.5))


@pytest.fixture(scope="session")
def vgg(caffemodels):
    return convert.convert(caffemodels["vgg16"])


# === The released formats against the reference logits ===
@pytest.mark.slow
@pytest.mark.parametrize("image,kind", [("2008_000009", "pad513"), ("2008_000009", "native"), ("2007_000033", "r321")])
def test_resnet101_single_scale_matches_reference(resnet, reference, image, kind):
    model, _ = resnet
    _assert_matches(model.network(_input(reference, image, kind)), reference[f"single/{image}/{kind}"])


@pytest.mark.slow
@pytest.mark.parametrize("image,kind", [("2007_000033", "pad513"), ("2008_000009", "r321")])
def test_resnet101_msc_matches_reference(resnet, reference, image, kind):
    model, _ = resnet
    _assert_matches(model(_input(reference, image, kind)), reference[f"msc/{image}/{kind}"], rel=2e-3)


@pytest.mark.slow
def test_resnet101_report_and_batchnorm_division(resnet):
    model, report = resnet
    assert report["backbone"] == "resnet101" and report["num_classes"] == 21 and report["aspp"] == "L"
    assert len(report["loaded"]) == 3 * 104 + 4 and report["keras_layers"] == 104 * 2 + 4  # conv, bn, scale; ASPP
    assert report["msc_copies"] == [] and report["ignored"] == [] and report["bn_epsilon"] == pytest.approx(1e-5)
    assert len(report["zero_bias"]) == 104 and report["bn_without_scale"] == []
    with np.load(REFERENCE / "resnet101_bn_calibration.npz") as calib:  # the statistics Caffe's blobs hold * s
        for caffe_bn, keras_bn in [("bn_conv1", "conv1_bn"), ("bn4b22_branch2b", "conv4_block23_2_bn")]:
            layer = model.network.get_layer(keras_bn)
            np.testing.assert_allclose(layer.moving_mean, calib[caffe_bn + "/mean"], rtol=1e-6, atol=1e-7)
            np.testing.assert_allclose(layer.moving_variance, calib[caffe_bn + "/var"], rtol=1e-6)
            np.testing.assert_array_equal(layer.gamma, calib[caffe_bn + "/gamma"])
    assert not np.any(model.network.get_layer("conv3_block4_2_conv").bias)


@pytest.mark.slow
def test_legacy_blobs_load_bit_identical(resnet, caffemodels):
    """--legacy-blobs (num/channels/height/width) holds the same weights: loaded bit for bit the same."""
    import deeplab_keras as dk

    model = dk.DeepLabV2(21, "resnet101")
    report = load_caffemodel(model, caffemodels["resnet101_legacy"])
    assert len(report["loaded"]) == len(resnet[1]["loaded"])
    for a, b in zip(model.network.get_weights(), resnet[0].network.get_weights()):
        np.testing.assert_array_equal(a, b)
    legacy = {layer.name: layer.blobs for layer in read_caffemodel(caffemodels["resnet101_legacy"])}
    assert legacy["res2a_branch2a"][0].shape == (64, 64, 1, 1) and legacy["bn_conv1"][2].shape == (1, 1, 1, 1)


@pytest.mark.slow
def test_vgg16_largefov_matches_reference_with_and_without_pool5a(vgg, caffemodels, reference):
    model, report = vgg
    assert report["pool5a"] is True and any(layer.name == "pool5a" for layer in model.network.layers)
    for kind in ("pad513", "native", "r321"):
        _assert_matches(model(_input(reference, "2007_000033", kind)),
                        reference[f"vgg16_largefov/single/2007_000033/{kind}"])
    assert caffemodel_config(caffemodels["vgg16_nopool5a"]) == {
        "backbone": "vgg16", "num_classes": 21, "aspp": "largefov", "pool5a": False}
    no_pool, report = convert.convert(caffemodels["vgg16_nopool5a"])
    assert report["pool5a"] is False and not any(layer.name == "pool5a" for layer in no_pool.network.layers)
    _assert_matches(no_pool(_input(reference, "2007_000033", "pad513")),
                    reference["vgg16_largefov_nopool5a/single/2007_000033/pad513"])
    with pytest.raises(CaffeModelError, match="has no pool5a.*pool5a=False"):
        load_caffemodel(model, caffemodels["vgg16_nopool5a"])


@pytest.mark.slow
def test_msc_branch_copies_are_checked_and_skipped(vgg, caffemodels):
    model, report = convert.convert(caffemodels["vgg16_msc"], msc_scales=(1.0, 0.75, 0.5))
    assert len(report["msc_copies"]) == 2 * 16 and "fc8_voc12_res075" in report["msc_copies"]
    assert report["loaded"] == vgg[1]["loaded"]
    for a, b in zip(model.network.get_weights(), vgg[0].network.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_reader_streams_the_generated_file(caffemodels):
    """Layer order, types, parameters and blob shapes as make_caffemodel.py documents them."""
    layers = list(read_caffemodel(caffemodels["vgg16"]))
    assert len(layers) == 39 and layers[0].name == "conv1_1" and layers[-1].name == "fc8_voc12"
    by_name = {layer.name: layer for layer in layers}
    assert by_name["pool5a"].pooling == {"pool": "AVE", "kernel_size": 3, "stride": 1, "pad": 1}
    assert by_name["pool1"].pooling["stride"] == 2 and by_name["relu1_1"].blobs == []
    assert by_name["fc6"].convolution["dilation"] == 12 and [b.shape for b in by_name["fc6"].blobs] == [
        (1024, 512, 3, 3), (1024,)]
    assert all(b.dtype == np.float32 and not b.flags.writeable for layer in layers for b in layer.blobs)


# === Variants of the released files (tiny models, files written by tests/caffe_writer.py) ===
def _write(path, layers, v1=False):
    path.write_bytes(cw.net(layers, v1=v1))
    return path


def _equal_networks(a, b, atol=0.0):
    for x, y in zip(a.network.get_weights(), b.network.get_weights()):
        np.testing.assert_allclose(x, y, rtol=0, atol=atol)


@pytest.mark.parametrize("style", ["shape", "legacy", "unpacked", "double"])
def test_resnet50_letters_and_blob_styles_round_trip(tmp_path, style):
    """ResNet-50 names (res4a..res4c); shape / legacy 4-D / unpacked-float / double blobs."""
    source = cw.randomize(tiny_model(3, "resnet50", stage_blocks=(1, 1, 3, 1)), seed=1)
    path = _write(tmp_path / "r50.caffemodel", cw.keras_to_caffe(source, bn_scale=4.0, style=style))
    assert {layer.name for layer in read_caffemodel(path)} >= {"res4c_branch2c", "scale4c_branch2c"}
    config = caffemodel_config(path)
    assert config == {"backbone": "resnet101", "num_classes": 3, "aspp": "L", "bn_epsilon": pytest.approx(1e-5),
                      "stage_blocks": (1, 1, 3, 1), "width_multiplier": 0.125}
    model, report = convert.convert(path, stage_blocks=(1, 1, 3, 1))
    _equal_networks(model, source)
    assert len(report["zero_bias"]) == 1 + 3 * (1 + 1 + 3 + 1) + 4  # every backbone conv: stem, blocks, shortcuts


def test_v1_layers_file(tmp_path):
    """Old Caffe files (DeepLab v1 era) store V1LayerParameter ``layers`` with enum types."""
    source = cw.randomize(tiny_model(3, "vgg16"), seed=12)
    path = _write(tmp_path / "v1.caffemodel", cw.keras_to_caffe(source, v1=True), v1=True)
    layers = {layer.name: layer for layer in read_caffemodel(path)}
    assert layers["conv1_1"].type == "Convolution" and layers["pool5a"].pooling["pool"] == "AVE"
    model, report = convert.convert(path)
    assert report["pool5a"] is True
    _equal_networks(model, source)


def test_from_weights_builds_the_model_the_file_implies(tmp_path):
    """DeepLabV2.from_weights (a classmethod: subclasses get their class): the file decides the ModelConfig, the
    arguments are checked against it; DeepLabV2(config=..., weights=file) loads the same weights."""
    import deeplab_keras as dk

    source = cw.randomize(tiny_model(3, "vgg16"), seed=13)
    path = _write(tmp_path / "lfov.caffemodel", cw.keras_to_caffe(source))

    class Sub(dk.DeepLabV2):
        pass

    model = Sub.from_weights(path, msc_scales=(1.0, 0.5))
    assert type(model) is Sub
    assert model.config == source.config.replace(msc_scales=(1.0, 0.5), pool5a=True)
    _equal_networks(model, source)
    _equal_networks(dk.DeepLabV2(config=source.config, weights=path), source)
    with pytest.raises(CaffeModelError, match="holds a 3-class head"):
        dk.DeepLabV2.from_weights(path, num_classes=5)


def test_resnet101_numbered_blocks_map_to_keras_blocks(tmp_path):
    source = cw.randomize(tiny_model(3, "resnet101", stage_blocks=(1, 3, 4, 1)), seed=2)
    path = _write(tmp_path / "r.caffemodel", cw.keras_to_caffe(source, numbered_stages=(3, 4), bn_scale=4.0))
    names = {layer.name for layer in read_caffemodel(path)}
    assert {"res3b2_branch2a", "res4b3_branch2c"} <= names and "res4d_branch2a" not in names
    target = tiny_model(3, "resnet101", stage_blocks=(1, 3, 4, 1))
    load_caffemodel(target, path)
    _equal_networks(target, source)


def test_vgg_aspp_and_largefov_heads(tmp_path):
    """VGG-ASPP: fc6_1..4 / fc7_1..4 / fc8_voc12_1..4 by dilation, no pool5a; LargeFOV: fc6/fc7/fc8_voc12."""
    source = cw.randomize(tiny_model(5, "vgg16", aspp="L"), seed=3)
    path = _write(tmp_path / "aspp.caffemodel", cw.keras_to_caffe(source))
    config = caffemodel_config(path)
    assert config == {"backbone": "vgg16", "num_classes": 5, "aspp": "L", "pool5a": False, "width_multiplier": 0.0625}
    model, report = convert.convert(path)
    assert "fc8_voc12_4" in report["loaded"] and report["aspp"] == "L"
    _equal_networks(model, source)
    shuffled = cw.keras_to_caffe(source)
    shuffled.insert(len(shuffled) - 12, shuffled.pop())  # fc8_voc12_4 before the fc6_1 branch: order does not matter
    model, _ = convert.convert(_write(tmp_path / "shuffled.caffemodel", shuffled))
    _equal_networks(model, source)
    with pytest.raises(CaffeModelError, match=r"rates \(6, 12, 18, 24\).*aspp='L'"):
        load_caffemodel(tiny_model(5, "vgg16", aspp="S"), path)


def test_backbone_only_inits_coco_and_imagenet(tmp_path):
    """COCO init: backbone + a 91-class 1x1 head; Kaiming's ImageNet nets: backbone + fc1000 (InnerProduct)."""
    source = cw.randomize(tiny_model(3, "resnet50", stage_blocks=(1, 1, 1, 1)), seed=4)
    coco = _write(tmp_path / "init.caffemodel", cw.keras_to_caffe(source, head="coco", bn_scale=4.0))
    imagenet = _write(tmp_path / "ResNet-50-model.caffemodel", cw.keras_to_caffe(source, head="imagenet", bn_scale=4.0))
    assert caffemodel_config(coco)["num_classes"] == 91 and "aspp" not in caffemodel_config(coco)
    assert "num_classes" not in caffemodel_config(imagenet)
    for path, head in [(coco, "fc1_coco"), (imagenet, "fc1000")]:
        target = tiny_model(21, "resnet50", stage_blocks=(1, 1, 1, 1))
        fresh_head = [np.array(w) for w in target.network.get_layer("aspp").get_weights()]
        with pytest.raises(CaffeModelError, match=f"{head}.*backbone_only=True"):
            load_caffemodel(target, path)
        report = load_caffemodel(target, path, backbone_only=True)
        assert report["ignored"] == [head] and report["head"] == "fresh"
        for a, b in zip(target.network.get_layer("aspp").get_weights(), fresh_head):
            np.testing.assert_array_equal(a, b)
        for layer in source.network.layers:
            if layer.weights and layer.name != "aspp":
                for a, b in zip(layer.get_weights(), target.network.get_layer(layer.name).get_weights()):
                    np.testing.assert_array_equal(a, b)
    model, report = convert.convert(coco, num_classes=21, backbone_only=True, stage_blocks=(1, 1, 1, 1))
    assert model.num_classes == 21 and report["ignored"] == ["fc1_coco"]
    with pytest.raises(CaffeModelError, match="91-class head"):
        convert.convert(coco, num_classes=21, stage_blocks=(1, 1, 1, 1))


def test_batchnorm_scale_factor_zero_and_eps(tmp_path):
    """Caffe's BatchNorm: statistics * (0 if s == 0 else 1/s); the file's eps must be the model's."""
    source = cw.randomize(tiny_model(3, "resnet50", stage_blocks=(1, 1, 1, 1)), seed=5)
    path = _write(tmp_path / "s0.caffemodel", cw.keras_to_caffe(source, bn_scale=0.0))
    target = tiny_model(3, "resnet50", stage_blocks=(1, 1, 1, 1))
    load_caffemodel(target, path)
    assert not np.any(target.network.get_layer("conv1_bn").moving_mean)
    assert not np.any(target.network.get_layer("conv1_bn").moving_variance)
    eps = _write(tmp_path / "eps.caffemodel", cw.keras_to_caffe(source, bn_eps=1e-3))
    assert caffemodel_config(eps)["bn_epsilon"] == pytest.approx(1e-3)
    with pytest.raises(CaffeModelError, match="eps is 0.001.*bn_epsilon=0.001"):
        load_caffemodel(target, eps)
    load_caffemodel(tiny_model(3, "resnet50", stage_blocks=(1, 1, 1, 1), bn_epsilon=1e-3), eps)


def test_msc_copy_that_differs_is_refused(tmp_path):
    source = cw.randomize(tiny_model(3, "vgg16"), seed=6)
    layers = cw.keras_to_caffe(source)
    fc8 = source.network.get_layer("aspp").branches[0][-1]
    copy = cw.layer("fc8_voc12_res05", "Convolution", [np.transpose(fc8.kernel, (3, 2, 0, 1)) + 1.0, fc8.bias],
                    conv=dict(num_output=3, kernel=1))
    equal = cw.layer("fc8_voc12_res075", "Convolution", [np.transpose(fc8.kernel, (3, 2, 0, 1)), fc8.bias],
                     conv=dict(num_output=3, kernel=1))
    report = load_caffemodel(tiny_model(3, "vgg16"), _write(tmp_path / "ok.caffemodel", layers + [equal]))
    assert report["msc_copies"] == ["fc8_voc12_res075"]
    with pytest.raises(CaffeModelError, match="fc8_voc12_res05 .*differ"):
        caffemodel_config(_write(tmp_path / "bad.caffemodel", layers + [equal, copy]))


# === Bad input: one clear CaffeModelError each ===
def _one_line(excinfo):
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_truncated_file(caffemodels, tmp_path):
    data = caffemodels["vgg16"].read_bytes()
    cut = tmp_path / "cut.caffemodel"
    cut.write_bytes(data[:len(data) // 2])
    with pytest.raises(CaffeModelError) as e:
        caffemodel_config(cut)
    assert "is truncated" in _one_line(e) and str(cut) in str(e.value)
    source = cw.randomize(tiny_model(3, "vgg16"), seed=7)
    layers = cw.keras_to_caffe(source)
    at_boundary = _write(tmp_path / "boundary.caffemodel", layers[:-3])  # cut between two layers: no head
    with pytest.raises(CaffeModelError, match="no classifier head.*truncated") as e:
        load_caffemodel(tiny_model(3, "vgg16"), at_boundary)
    in_backbone = _write(tmp_path / "backbone.caffemodel", layers[:-8])  # pool4 is the last layer
    with pytest.raises(CaffeModelError, match=r"no weights for 3 of the model's layers \(block5_conv1, .*truncated"):
        load_caffemodel(tiny_model(3, "vgg16"), in_backbone, backbone_only=True)
    _one_line(e)


def test_layer_that_does_not_fit_names_both_shapes(tmp_path):
    source = cw.randomize(tiny_model(3, "vgg16"), seed=8)
    path = _write(tmp_path / "w.caffemodel", cw.keras_to_caffe(source))
    target = tiny_model(3, "vgg16", width_multiplier=0.125)
    before = [np.array(w) for w in target.get_weights()]
    with pytest.raises(CaffeModelError) as e:
        load_caffemodel(target, path)
    assert "conv1_1 has weights of shape (4, 3, 3, 3)" in _one_line(e) and "(8, 3, 3, 3)" in str(e.value)
    for a, b in zip(target.get_weights(), before):  # checked before anything is assigned
        np.testing.assert_array_equal(a, b)


def test_class_count_that_differs_says_what_the_file_holds(caffemodels):
    with pytest.raises(CaffeModelError) as e:
        convert.convert(caffemodels["vgg16"], num_classes=5)
    assert "holds a 21-class head (fc6, fc7, fc8_voc12)" in _one_line(e) and "--num-classes 21" in str(e.value)
    with pytest.raises(CaffeModelError, match="resnet101 backbone, not resnet50"):
        convert.convert(caffemodels["resnet101"], backbone="resnet50")


def test_unknown_layers_are_listed(tmp_path):
    source = cw.randomize(tiny_model(3, "vgg16"), seed=9)
    extra = [cw.layer("mystery_conv", "Convolution", [np.ones((2, 2, 1, 1))], conv=dict(num_output=2, kernel=1)),
             cw.layer("prelu1", "PReLU", [np.ones(4)]),
             cw.layer("relu_no_weights", "ReLU")]
    path = _write(tmp_path / "u.caffemodel", cw.keras_to_caffe(source) + extra)
    with pytest.raises(CaffeModelError) as e:
        load_caffemodel(tiny_model(3, "vgg16"), path)
    assert "2 layers with weights" in _one_line(e) and "mystery_conv, prelu1" in str(e.value)


@pytest.mark.parametrize("content,hint", [
    (b"", "is empty"),
    (b"name: \"DeepLab\"\nlayer {\n  name: \"conv1\"\n}\n", "text .prototxt"),
    (b"PK\x03\x04" + bytes(60), "zip archive"),
    (b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19." + bytes(40), "pickle"),
    (bytes(range(256)) * 8, "not a .caffemodel"),
    (b"\x0a\x03abc", "not a .caffemodel"),  # a valid NetParameter name and no layers
])
def test_not_a_caffemodel(tmp_path, content, hint):
    path = tmp_path / "x.caffemodel"
    path.write_bytes(content)
    with pytest.raises(CaffeModelError) as e:
        caffemodel_config(path)
    assert hint in _one_line(e) and str(path) in str(e.value)
    with pytest.raises(CaffeModelError, match="does not exist"):
        caffemodel_config(tmp_path / "missing.caffemodel")


def test_keras_file_is_not_a_caffemodel(tmp_path):
    path = tmp_path / "m.caffemodel"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("config.json", "{}")
    with pytest.raises(CaffeModelError, match="zip archive"):
        caffemodel_config(path)


# === DeepLabV2(weights=...) and export of a converted model ===
def test_deeplabv2_weights_argument_takes_a_caffemodel(tmp_path):
    source = cw.randomize(tiny_model(3, "vgg16"), seed=10)
    path = _write(tmp_path / "v.caffemodel", cw.keras_to_caffe(source))
    _equal_networks(tiny_model(3, "vgg16", weights=str(path)), source)
    with pytest.raises(CaffeModelError, match="3-class head"):
        tiny_model(4, "vgg16", weights=str(path))


@pytest.mark.slow
def test_converted_model_exports_and_verifies(tmp_path, voc_samples_dir):
    """A converted .keras is a normal model: SavedModel, TFLite and ONNX exports verify against Keras."""
    from deeplab_keras.export.onnx import export_onnx
    from deeplab_keras.export.saved_model import export_saved_model
    from deeplab_keras.export.tflite import export_tflite
    from deeplab_keras.weights import load_model

    source = cw.randomize(tiny_model(3, "resnet50", stage_blocks=(1, 1, 1, 1)), seed=11)
    path = _write(tmp_path / "r.caffemodel", cw.keras_to_caffe(source, bn_scale=4.0))
    out = tmp_path / "converted.keras"
    caffe.convert_caffemodel(path, out)
    model = load_model(out)
    _equal_networks(model, source)
    samples = dict(sample_dir=str(voc_samples_dir / "VOC2012"), num_samples=2, verify_size=(65, 81))
    reports = [export_saved_model(model, str(tmp_path / "sm"), **samples),
               export_tflite(model, str(tmp_path / "m.tflite"), input_size=(65, 81), **samples),
               export_onnx(model, str(tmp_path / "m.onnx"), input_size=(65, 81), **samples)]
    for report in reports:
        assert report["verification"]["passed"] is True


def test_convert_writes_nothing_on_error(caffemodels, tmp_path):
    out = tmp_path / "m.keras"
    with pytest.raises(CaffeModelError):
        caffe.convert_caffemodel(caffemodels["vgg16"], out, num_classes=4)
    with pytest.raises(CaffeModelError, match="must end with .keras"):
        caffe.convert_caffemodel(caffemodels["vgg16"], tmp_path / "m.h5")
    assert os.listdir(tmp_path) == []


# === deeplab-pytorch .pth state dicts, read without torch (tests/data/make_pth_fixtures.py wrote the files) ===
PTH = REPO / "tests" / "data" / "pth"


def _fixture_source(name):
    """The randomized tiny model a kazuto fixture was written from (make_pth_fixtures.KAZUTO)."""
    seed, model_args = {"kazuto_aspp": (20, dict(num_classes=3, backbone="resnet101", width_multiplier=1 / 32)),
                        "kazuto_coco": (13, dict(num_classes=3, backbone="resnet50", width_multiplier=1 / 32))}[name]
    return cw.randomize(tiny_model(**model_args), seed=seed)


def _same_backbone(a, b, with_head=True):
    for layer in a.network.layers:
        if layer.weights and (with_head or layer.name != "aspp"):
            for x, y in zip(layer.get_weights(), b.network.get_layer(layer.name).get_weights()):
                np.testing.assert_array_equal(x, y)


@pytest.mark.slow
def test_pth_of_the_generated_caffemodel_matches_the_reference(resnet, caffemodels, reference):
    """kazuto's converted release names at full size (base.layer4.block23..., his BatchNorm conversion) map onto
    the model bit for bit as the .caffemodel does, and the logits match the reference (the file format itself
    is tested on the torch-written fixtures below)."""
    import deeplab_keras as dk
    from deeplab_keras.weights import pth

    state = cw.kazuto_state_dict(read_caffemodel(caffemodels["resnet101"]))
    assert "base.layer4.block23.conv3x3.bn.running_var" in state and len(state) == 104 * 6 + 8
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    model = dk.DeepLabV2(21, "resnet101")
    report = convert.load_scan(model, pth.state_scan(*pth.state_layers(state, "mem.pth"), "mem.pth"))
    assert len(report["loaded"]) == len(resnet[1]["loaded"]) and report["num_classes"] == 21
    for a, b in zip(model.network.get_weights(), resnet[0].network.get_weights()):
        np.testing.assert_array_equal(a, b)
    _assert_matches(model(_input(reference, "2007_000033", "r321")), reference["single/2007_000033/r321"])


def test_pth_kazuto_release_names_load_bit_for_bit():
    """A torch.save'd state dict in kazuto's release names (base. prefix, numbered res4b1 blocks) fills the model
    exactly as the randomized source it was written from."""
    from deeplab_keras.weights.pth import load_pth

    source = _fixture_source("kazuto_aspp")
    target = tiny_model(3, "resnet101", width_multiplier=1 / 32)
    report = load_pth(target, PTH / "kazuto_aspp.pth")
    assert report["num_classes"] == 3 and report["aspp"] == "L" and len(report["loaded"]) == 3 + 19 * 3 + 4
    _same_backbone(source, target)


def _expected_tensors():
    """tensors.pth's values (make_pth_fixtures.tensors) in numpy."""
    base = np.arange(24, dtype=np.float32).reshape(4, 6)
    return collections.OrderedDict([
        ("w", base), ("t", base.T), ("view", base[1:, 2:4]), ("half", np.linspace(-2, 2, 5).astype(np.float16)),
        ("bf16", np.array([1.5, -3.25], np.float32)), ("n", np.array(7, np.int64)),
        ("p", np.ones((2, 3), np.float32)), ("d", np.zeros(3) + 0.1)])


@pytest.mark.parametrize("name", ["tensors.pth", "tensors_legacy.pth"])
def test_read_pth_tensors_without_torch(name):
    """Zip (torch >= 1.6) and legacy pickle files: dtypes, strided views, shared storages, parameters."""
    from deeplab_keras.weights.pth import read_pth

    got, expected = read_pth(PTH / name), _expected_tensors()
    assert list(got) == list(expected)
    for key, value in expected.items():
        np.testing.assert_array_equal(got[key], value)
        assert got[key].shape == value.shape and got[key].dtype == value.dtype, key
    assert got["t"].flags.c_contiguous and not got["w"].flags.writeable


def test_pth_reader_refuses_code(tmp_path, monkeypatch):
    from deeplab_keras.weights.pth import PthError, read_pth

    monkeypatch.chdir(tmp_path)
    with pytest.raises(PthError, match="refers to posix.mkdir.*refusing") as e:
        read_pth(PTH / "evil.pth")
    assert not (tmp_path / "pth_exploit_ran").exists() and "\n" not in str(e.value)


def test_pth_bad_files(tmp_path):
    from deeplab_keras.weights.pth import PthError, read_pth

    for name in ("tensors.pth", "tensors_legacy.pth"):
        data = (PTH / name).read_bytes()
        (tmp_path / "cut.pth").write_bytes(data[:len(data) // 2])
        with pytest.raises(PthError, match="cut.pth"):
            read_pth(tmp_path / "cut.pth")
    with zipfile.ZipFile(tmp_path / "model.pth", "w") as z:  # a .keras renamed
        z.writestr("config.json", "{}")
    with pytest.raises(PthError, match="without <name>/data.pkl"):
        read_pth(tmp_path / "model.pth")
    (tmp_path / "text.pth").write_text("hello")
    with pytest.raises(PthError, match="not a .pth file"):
        read_pth(tmp_path / "text.pth")


def test_pth_coco_init_backbone_only_and_unknown_tensors():
    """kazuto's DeepLabV1 COCO init (no 'base.' prefix, a 1x1 'fc' head): backbone only; foreign keys listed."""
    from deeplab_keras.weights.pth import PthError, load_pth, read_pth

    assert read_pth(PTH / "kazuto_coco.pth")["fc.weight"].shape[0] == 91
    target = tiny_model(21, "resnet50", width_multiplier=1 / 32)
    with pytest.raises(CaffeModelError, match="classifier fc is not a DeepLab v2"):
        load_pth(target, PTH / "kazuto_coco.pth")
    assert load_pth(target, PTH / "kazuto_coco.pth", backbone_only=True)["ignored"] == ["fc"]
    _same_backbone(_fixture_source("kazuto_coco"), target, with_head=False)
    with pytest.raises(PthError, match="1 tensors that are not part of .*: decoder.conv.weight"):
        load_pth(target, PTH / "kazuto_decoder.pth", backbone_only=True)
