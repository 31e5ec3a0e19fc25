"""Class weights (optimizer.class_weights): the weighted loss by hand, the frequency weightings, the counts stored
in the run directory and reused on resume."""
import json

import numpy as np
import pytest
import tensorflow as tf

from deeplab_keras import train as T
from deeplab_keras.training import losses, run
from tests.test_train_recipe import tiny_config


def test_weighted_loss_equals_the_hand_computed_one():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 3, 4, 3)).astype(np.float32)
    labels = rng.integers(0, 3, (2, 3, 4)).astype(np.uint8)
    labels[0, 0, :2] = 255
    weights = np.array([0.5, 2.0, 4.0], np.float32)
    loss_sum, count = losses.segmentation_loss(labels, logits, class_weights=weights)
    total, norm = 0.0, 0.0
    for n, i, j in np.ndindex(labels.shape):
        c = labels[n, i, j]
        if c == 255:
            continue
        z = logits[n, i, j].astype(np.float64)
        total += weights[c] * (np.log(np.exp(z).sum()) - z[c])
        norm += weights[c]
    np.testing.assert_allclose([float(loss_sum), float(count)], [total, norm], rtol=1e-5)
    trainer = T.SegmentationTrainer(tf.keras.Sequential(), 3, class_weights=weights)
    np.testing.assert_allclose(float(trainer.compute_loss(y=labels, y_pred={"fused": logits}, training=False)),
                               total / norm, rtol=1e-5)
    unweighted = losses.segmentation_loss(labels, logits, class_weights=np.full(3, 7.0, np.float32))
    plain = losses.segmentation_loss(labels, logits)
    np.testing.assert_allclose(float(unweighted[0] / unweighted[1]), float(plain[0] / plain[1]), rtol=1e-6)


def test_frequency_weightings_by_hand():
    labels = [np.array([[0, 0, 0, 1]], np.uint8), np.array([[0, 255, 2, 2]], np.uint8),
              np.array([[0, 0, 1, 255]], np.uint8)]
    counts = losses.count_class_pixels([{"label": x} for x in labels], 4, progress=False)
    assert counts["pixels"] == [6, 2, 2, 0] and counts["image_pixels"] == [10, 7, 3, 0] and counts["images"] == 3
    inverse = losses.class_weights_from("inverse_frequency", counts)
    np.testing.assert_allclose(inverse, [10 / (3 * 6), 10 / (3 * 2), 10 / (3 * 2), 0], rtol=1e-6)
    freq = np.array([6 / 10, 2 / 7, 2 / 3])
    median = losses.class_weights_from("median_frequency", counts)
    np.testing.assert_allclose(median, list(np.median(freq) / freq) + [0], rtol=1e-6)
    assert losses.class_weights_from("none", counts) is None
    with pytest.raises(ValueError, match="lists 2 weights but model.num_classes is 4"):
        losses.class_weights_from([1, 2], num_classes=4)
    with pytest.raises(ValueError, match="bad.png holds label values \\[7\\]"):
        losses.count_class_pixels([{"label": np.array([[7]], np.uint8), "file_name": "bad.png"}], 4, progress=False)


def test_counted_once_into_the_run_dir_and_reused_on_resume(tmp_path, monkeypatch, capsys):
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 3, (4, 41, 41)).astype(np.uint8)
    labels[:, :5] = 255
    data = tf.data.Dataset.from_tensor_slices({"image": rng.integers(0, 256, (4, 41, 41, 3)).astype(np.uint8),
                                               "label": labels})
    sets = ["data.flip=false", "data.scale_range=null", "data.crop_size=41,41", "schedule.steps=1",
            "optimizer.class_weights=median_frequency", "runtime.verbose=2"]
    cfg = tiny_config(tmp_path, *sets)
    T.train(cfg, train_data=data)
    assert "class frequencies" in capsys.readouterr().err  # the progress bar (verbose 0 / --quiet hides it)
    saved = json.loads((tmp_path / "run" / "class_frequencies.json").read_text())
    assert saved["pixels"] == np.bincount(labels[labels != 255], minlength=3).tolist() and saved["images"] == 4

    def no_recount(*args, **kwargs):
        raise AssertionError("the class frequencies were counted again")

    monkeypatch.setattr(losses, "count_class_pixels", no_recount)
    assert run._class_counts(cfg, str(tmp_path / "run"), data) == saved  # what a resumed train() reads
    with pytest.raises(ValueError, match="optimizer.class_weights lists 2 weights"):
        T.train(tiny_config(tmp_path, "optimizer.class_weights=1,2", f"runtime.run_dir={tmp_path / 'other'}"),
                train_data=data)
    with pytest.raises(ValueError, match="optimizer.class_weights"):
        tiny_config(tmp_path, "optimizer.class_weights=balanced")
