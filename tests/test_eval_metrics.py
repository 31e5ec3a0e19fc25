"""Evaluation: confusion-matrix mIoU vs keras.metrics.MeanIoU, full-resolution multi-scale/flip inference, CRF on
and off in one run, the table, JSON, and the deeplab-eval CLI."""
import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import deeplab_keras as dk
from deeplab_keras import cli
from deeplab_keras import evaluate as E
from deeplab_keras.data import make_synthetic, write_synthetic_folder
from tests import conftest

VOC_SAMPLES = str(conftest.VOC_SAMPLES)  # the 7 VOC 2012 pairs packaged with deeplab_keras


@pytest.fixture(scope="module")
def tiny_model():
    keras.utils.set_random_seed(0)
    return dk.DeepLabV2(num_classes=4, backbone="resnet50", width_multiplier=0.125, stage_blocks=(1, 1, 1, 1))


@pytest.fixture(scope="module")
def tiny_path(tiny_model, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("ckpt") / "tiny.keras")
    tiny_model.save(path)
    return path


def test_confusion_miou_matches_keras_meaniou():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, (3, 31, 29))
    labels[:, :4] = 255
    preds = np.where(rng.random(labels.shape) < 0.7, labels % 5, rng.integers(0, 5, labels.shape))
    preds[preds == 3] = 1  # class 3 never predicted
    labels[labels == 4] = 0  # class 4 absent from the ground truth but predicted
    cm = E.confusion_matrix(labels, preds, 6)  # class 5: absent from both -> not counted
    s = E.scores(cm)
    ref = keras.metrics.MeanIoU(6, ignore_class=255)
    ref.update_state(labels, preds)
    np.testing.assert_allclose(s["miou"], float(ref.result()), rtol=1e-6)
    assert s["per_class_iou"]["5"] is None and s["per_class_iou"]["3"] == 0.0
    valid = labels != 255
    assert s["pixels"] == valid.sum()
    np.testing.assert_allclose(s["pixel_accuracy"], (preds == labels)[valid].mean())
    with pytest.raises(ValueError, match="outside 0..5"):
        E.confusion_matrix(np.array([7]), np.array([0]), 6)
    with pytest.raises(ValueError, match="same shape"):
        E.confusion_matrix(np.zeros((2, 2)), np.zeros((3, 2)), 6)


def test_full_resolution_probabilities_scales_and_flip(tiny_model):
    image = np.random.default_rng(1).uniform(0, 255, (1, 45, 53, 3)).astype("float32")
    p = E.predict_probabilities(tiny_model, image)
    assert p.shape == (1, 45, 53, 4)
    np.testing.assert_allclose(p.sum(-1), 1.0, atol=1e-5)
    logits = tiny_model(image).numpy()  # [1, 6, 7, 4] at OS 8 -> corner-aligned upsampling
    assert logits.shape == (1, 6, 7, 4)
    np.testing.assert_allclose(p[0, 0, 0], tf.nn.softmax(logits[0, 0, 0]).numpy(), atol=1e-5)
    np.testing.assert_allclose(p[0, -1, -1], tf.nn.softmax(logits[0, -1, -1]).numpy(), atol=1e-5)
    flipped = E.predict_probabilities(tiny_model, image[:, :, ::-1])
    both = E.predict_probabilities(tiny_model, image, flip=True)
    np.testing.assert_allclose(both, (p + flipped[:, :, ::-1]) / 2, atol=1e-5)
    multi = E.predict_probabilities(tiny_model, image, scales=(0.75, 1.0, 1.5))
    assert multi.shape == p.shape and not np.allclose(multi, p)
    with pytest.raises(ValueError, match="positive scales"):
        E.predict_probabilities(tiny_model, image, scales=(0.0,))


def test_evaluate_crf_on_and_off_in_one_run(tiny_model):
    ds = make_synthetic(3, size=(41, 47), num_classes=4, seed=5)
    results = E.evaluate(tiny_model, ds, crf=True, crf_params={"iterations": 3}, progress=False)
    assert results["images"] == 3 and set(results) >= {"no_crf", "crf"}
    cms = {"no_crf": 0, "crf": 0}
    for ex in ds:
        image, label = ex["image"].numpy(), ex["label"].numpy()
        probs = E.predict_probabilities(tiny_model, image[None])
        refined = dk.crf.dense_crf(probs, image[None], dk.crf.CRFParams(iterations=3))
        cms["no_crf"] = cms["no_crf"] + E.confusion_matrix(label, probs[0].argmax(-1), 4)
        cms["crf"] = cms["crf"] + E.confusion_matrix(label, np.asarray(refined)[0].argmax(-1), 4)
    for key in cms:
        np.testing.assert_array_equal(np.array(results[key]["confusion_matrix"]), cms[key])
        assert results[key]["miou"] == pytest.approx(E.scores(cms[key])["miou"])
    assert not np.array_equal(cms["crf"], cms["no_crf"])
    table = E.format_table(results)
    assert "IoU (CRF)" in table and "mIoU" in table and "pixel accuracy" in table
    batched = E.evaluate(tiny_model, ds.batch(3), progress=False, max_images=2)  # batched input, a limit
    assert batched["images"] == 2 and "crf" not in batched


def test_deeplab_eval_cli_synthetic_and_folder(tiny_path, tmp_path, capsys):
    out = tmp_path / "eval.json"
    code = cli.eval_main(["--checkpoint", tiny_path, "--data", "synthetic", "--num-images", "2", "--image-size",
                          "41", "41", "--crf", "--crf-iterations", "2", "--scales", "0.75", "1", "--flip",
                          "--out", str(out), "--quiet"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "IoU (CRF)" in printed and "class_1" in printed
    results = json.loads(out.read_text())
    assert results["images"] == 2 and results["scales"] == [0.75, 1.0] and results["flip"] is True
    assert 0 <= results["no_crf"]["miou"] <= 1 and "crf" in results
    folder = write_synthetic_folder(str(tmp_path / "folder"), 2, size=(41, 41), num_classes=4, seed=1)
    assert cli.eval_main(["--checkpoint", tiny_path, "--data", folder, "--quiet"]) == 0
    assert os.path.exists(os.path.join(os.path.dirname(tiny_path), "eval.json"))  # default --out


@pytest.mark.parametrize("argv, message", [
    (["--checkpoint", "/nonexistent.keras", "--data", "synthetic"], "does not exist"),
    (["--checkpoint", "{ckpt}", "--data", "/nonexistent_dir"], "neither 'synthetic' nor an existing folder"),
    (["--checkpoint", "{ckpt}", "--data", "synthetic", "--scales", "-1"], "--scales must be positive"),
    (["--checkpoint", "{ckpt}", "--data", "synthetic", "--crf-params", "foo=1"], "expected KEY=NUMBER"),
    (["--data", "synthetic"], "--checkpoint"),
])
def test_deeplab_eval_cli_errors(tiny_path, argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        cli.eval_main([a.replace("{ckpt}", tiny_path) for a in argv])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and err[-1].startswith("deeplab-eval: error:")


def test_deeplab_eval_cli_voc_samples(tmp_path, capsys):
    keras.utils.set_random_seed(1)
    model = dk.DeepLabV2(num_classes=21, backbone="resnet50", width_multiplier=0.125, stage_blocks=(1, 1, 1, 1))
    path = str(tmp_path / "voc_tiny.keras")
    model.save(path)
    out = tmp_path / "voc.json"
    assert cli.eval_main(["--checkpoint", path, "--data", VOC_SAMPLES, "--split", "train", "--data-dir",
                          str(tmp_path / "tfds"), "--out", str(out), "--quiet"]) == 0
    results = json.loads(out.read_text())
    assert results["images"] >= 1 and "aeroplane" in results["no_crf"]["per_class_iou"]
    assert "background" in capsys.readouterr().out
