"""The paper's test protocol in deeplab-eval: padding to a fixed size with the mean colour (checked against a
computation written out by hand), the crop back, the image-too-large error, and --protocol deeplab-v2."""
import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import tiny_model
from deeplab_keras import cli
from deeplab_keras import crf as dk_crf, evaluate as E
from deeplab_keras.inference import Predictor

MEAN_RGB = (122.675, 116.669, 104.008)  # DeepLab v2's mean colour (R, G, B), written out independently
PAPER_CRF = dict(iterations=10, bilateral_weight=4.0, bilateral_xy_std=67.0, bilateral_rgb_std=3.0,
                 gaussian_weight=3.0, gaussian_xy_std=1.0)  # DeepLab v2 ResNet-101 (TPAMI 2017, pydensecrf meaning)


@pytest.fixture(scope="module")
def model():
    keras.utils.set_random_seed(3)
    return tiny_model(3)


@pytest.fixture(scope="module")
def model_path(model, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("protocol") / "tiny.keras")
    model.save(path)
    return path


def _examples():
    rng = np.random.default_rng(0)
    out = []
    for height, width in ((40, 50), (57, 33)):
        image = rng.integers(0, 256, (height, width, 3)).astype(np.uint8)
        label = rng.integers(0, 3, (height, width)).astype(np.uint8)
        label[:3] = 255
        out.append((image, label))
    return out


def _manual_probabilities(model, image, size, colour):
    """Pad with ``colour`` by hand, run the network, resize the logits corner-aligned, softmax, crop."""
    height, width = image.shape[:2]
    canvas = np.empty((1, size, size, 3), np.float32)
    canvas[...] = colour
    canvas[0, :height, :width] = image
    logits = model(canvas, training=False)
    full = tf.compat.v1.image.resize_bilinear(logits, (size, size), align_corners=True)
    return tf.nn.softmax(full, axis=-1).numpy()[:, :height, :width]


def test_pad_image_places_the_image_top_left_on_the_mean_colour():
    image = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    padded = E.pad_image(image, 5)
    assert padded.shape == (5, 5, 3) and padded.dtype == np.float32
    np.testing.assert_array_equal(padded[:2, :3], image)
    np.testing.assert_allclose(padded[2:, :], np.broadcast_to(MEAN_RGB, (3, 5, 3)), rtol=0, atol=1e-4)
    np.testing.assert_allclose(padded[:2, 3:], np.broadcast_to(MEAN_RGB, (2, 2, 3)), rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="does not fit the 4x4 padding; raise --pad-to"):
        E.pad_image(np.zeros((5, 3, 3), np.uint8), 4)


def test_model_mean_colour_is_deeplab_v2s(model):
    np.testing.assert_allclose(E.model_mean_rgb(model), MEAN_RGB, rtol=0, atol=1e-6)


def test_padded_probabilities_equal_the_manual_computation(model):
    predictor = Predictor(model)
    for image, _ in _examples():
        got = E.padded_probabilities(predictor, image, 65, E.model_mean_rgb(model))
        want = _manual_probabilities(model, image, 65, MEAN_RGB)
        assert got.shape == (1,) + image.shape[:2] + (3,)
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-5)
        # the colour and the padding matter: black padding and no padding give other probabilities
        black = _manual_probabilities(model, image, 65, (0.0, 0.0, 0.0))
        assert np.abs(got - black).max() > 1e-3
        assert np.abs(got - predictor(image[None].astype(np.float32)).numpy()).max() > 1e-3


def test_padded_evaluation_equals_the_manual_confusion_matrix(model):
    examples = _examples()
    results = E.evaluate(model, examples, 3, pad_to=65, progress=False)
    want = np.zeros((3, 3), np.int64)
    for image, label in examples:
        pred = _manual_probabilities(model, image, 65, MEAN_RGB)[0].argmax(-1)
        keep = label != 255
        np.add.at(want, (label[keep].astype(int), pred[keep]), 1)
    np.testing.assert_array_equal(np.array(results["no_crf"]["confusion_matrix"]), want)
    assert results["pad_to"] == 65 and results["no_crf"]["pixels"] == want.sum()
    unpadded = E.evaluate(model, examples, 3, progress=False)
    assert unpadded["pad_to"] is None


def test_image_larger_than_the_padding_is_one_clear_error(model):
    image, label = _examples()[0]  # 40x50
    with pytest.raises(ValueError, match=r"image image_0: a 40x50 image does not fit the 45x45 padding; raise "
                                         r"--pad-to \(pad_to\) to at least 50"):
        E.evaluate(model, [(image, label)], 3, pad_to=45, progress=False)


def test_protocol_deeplab_v2_sets_pad_513_and_the_papers_crf(model_path, tmp_path, capsys):
    out = tmp_path / "eval.json"
    code = cli.eval_main(["--checkpoint", model_path, "--data", "synthetic", "--num-images", "2", "--image-size",
                          "41", "57", "--protocol", "deeplab-v2", "--out", str(out), "--quiet"])
    assert code == 0
    captured = capsys.readouterr()
    assert "padded to 513" in captured.out and "IoU (CRF)" in captured.out
    assert "no msc_scales" in captured.err  # the tiny model is single-scale: said, not hidden
    results = json.loads(out.read_text())
    assert results["protocol"] == "deeplab-v2" and results["pad_to"] == 513
    assert results["scales"] == [1.0] and results["flip"] is False
    assert results["crf_params"] == PAPER_CRF and "crf" in results and "no_crf" in results
    assert dk_crf.CRFParams().to_dict() == PAPER_CRF


def test_pad_to_without_protocol(model_path, tmp_path):
    out = tmp_path / "eval.json"
    assert cli.eval_main(["--checkpoint", model_path, "--data", "synthetic", "--num-images", "1", "--image-size",
                          "41", "57", "--pad-to", "65", "--out", str(out), "--quiet"]) == 0
    results = json.loads(out.read_text())
    assert results["pad_to"] == 65 and results["crf_params"] is None and results["protocol"] is None


@pytest.mark.parametrize("extra, message", [
    (["--scales", "0.5", "1"], "drop --scales 0.5 1"),
    (["--flip"], "drop --flip"),
    (["--pad-to", "321"], "drop --pad-to 321"),
    (["--crf-iterations", "5"], "drop --crf-iterations"),
    (["--crf-params", "bilateral_weight=5"], "drop --crf-params"),
])
def test_protocol_refuses_contradicting_options(model_path, extra, message, capsys):
    with pytest.raises(SystemExit) as e:
        cli.eval_main(["--checkpoint", model_path, "--data", "synthetic", "--protocol", "deeplab-v2"] + extra)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and err[0].startswith("deeplab-eval: error: --protocol deeplab-v2")


def test_cli_image_larger_than_pad_to_exits_2(model_path, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.eval_main(["--checkpoint", model_path, "--data", "synthetic", "--num-images", "1", "--image-size",
                       "41", "57", "--pad-to", "50", "--out", str(tmp_path / "e.json"), "--quiet"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not fit the 50x50 padding" in err[0]
    assert not (tmp_path / "e.json").exists()
