"""Gradient accumulation (optimizer.accumulation_steps, Caffe's iter_size): K batches of B per update equal one
batch of K x B with frozen batch norm, with the per-layer learning rates, momentum and the poly schedule."""
import numpy as np
import pytest
import tensorflow as tf

from deeplab_keras import train as T
from tests.test_train_recipe import tiny_config


def _data(n=8, size=41, seed=5):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    labels = rng.integers(0, 3, (n, size, size), dtype=np.uint8)
    labels[0, :25] = 255  # unequal ignored areas: each micro-batch has its own valid-pixel count
    labels[3, :, :7] = 255
    return tf.data.Dataset.from_tensor_slices({"image": images, "label": labels})


def _train(tmp_path, name, batch_size, k, weights):
    cfg = tiny_config(tmp_path, f"runtime.run_dir={tmp_path / name}", "schedule.steps=2", "data.flip=false",
                      "data.scale_range=null", "data.crop_size=41,41", f"data.batch_size={batch_size}",
                      f"optimizer.accumulation_steps={k}", "optimizer.base_lr=0.01", "optimizer.weight_decay=0.01",
                      "optimizer.lr_power=0.9")
    net = T.build_model(cfg)
    net.set_weights(weights)
    T.train(cfg, model=net, train_data=_data())
    return [v.numpy() for v in net.weights]


@pytest.mark.slow
def test_k_batches_of_b_equal_one_batch_of_k_times_b(tmp_path):
    cfg = tiny_config(tmp_path)
    w0 = T.build_model(cfg).get_weights()
    whole = _train(tmp_path, "whole", 4, 1, w0)
    accumulated = _train(tmp_path, "accumulated", 2, 2, w0)
    assert max(np.abs(a - b).max() for a, b in zip(whole, w0)) > 1e-3  # two updates did move the weights
    for a, b in zip(accumulated, whole):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)  # float32 sums in another order


def test_accumulation_steps_are_checked():
    with pytest.raises(ValueError, match="optimizer.accumulation_steps"):
        T.TrainConfig.from_dict({"optimizer": {"accumulation_steps": 0}})
    net = T.build_model(tiny_config(__import__("pathlib").Path("/tmp")))
    with pytest.raises(ValueError, match="upsample_logits"):
        T.SegmentationTrainer(net, 3, accumulation_steps=2, upsample_logits=False)
