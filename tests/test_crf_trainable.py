"""A CRF that learns: DenseCRF(trainable=True), the model.crf section, training through the CRF, the learned values
in .keras files and in every export (through the portable CRF)."""
import keras
import numpy as np
import pytest
import tensorflow as tf

import deeplab_keras as dk
from deeplab_keras.models.config import CRFConfig, ModelConfig
from tests.conftest import tiny_model

PARAMS = dk.crf.CRFParams(iterations=3, bilateral_xy_std=5.0, bilateral_rgb_std=20.0)


def _noisy_problem(seed=0, n=4, size=16, classes=3):
    """Piecewise-constant labels, images coloured by label, and probabilities that are noisy near the truth."""
    rng = np.random.default_rng(seed)
    labels = np.zeros((n, size, size), np.int64)
    for i in range(n):
        cut = rng.integers(4, size - 4, 2)
        labels[i, :cut[0]] = 1
        labels[i, :, :cut[1]] += 1
    labels %= classes
    colours = rng.integers(0, 256, (classes, 3))
    images = np.clip(colours[labels] + rng.normal(0, 8, (n, size, size, 3)), 0, 255).astype("uint8")
    logits = 1.2 * np.eye(classes)[labels] + rng.normal(0, 1.0, (n, size, size, classes))
    return tf.nn.softmax(logits.astype("float32")).numpy(), images, labels


def _crf_model(size=16, classes=3, **layer_kwargs):
    probs = keras.Input((size, size, classes))
    images = keras.Input((size, size, 3), dtype="uint8")
    layer = dk.crf.DenseCRF(PARAMS, **layer_kwargs)
    return keras.Model([probs, images], layer([probs, images])), layer


def test_trainable_layer_learns_and_keeps_its_constraints(tmp_path):
    probs, images, labels = _noisy_problem()
    model, layer = _crf_model(trainable=True)
    assert sorted(w.path.split("/")[-1] for w in model.trainable_weights) == [
        "bilateral_weight", "compatibility", "gaussian_weight"]
    np.testing.assert_array_equal(layer.learned_compatibility, 1 - np.eye(3))
    assert layer.learned_params == PARAMS
    model.compile(optimizer=keras.optimizers.Adam(0.1), loss=keras.losses.SparseCategoricalCrossentropy())
    history = model.fit([probs, images], labels, epochs=6, batch_size=4, verbose=0).history["loss"]
    assert history[-1] < history[0]
    mu = layer.learned_compatibility
    np.testing.assert_allclose(mu, mu.T, atol=1e-6)
    assert not np.allclose(mu, 1 - np.eye(3))
    learned = layer.learned_params
    assert learned.bilateral_weight != PARAMS.bilateral_weight and learned.gaussian_xy_std == PARAMS.gaussian_xy_std
    assert min(learned.bilateral_weight, learned.gaussian_weight) >= 1e-4
    # The learned values live in the .keras file, and the portable CRF computes the same with them.
    path = str(tmp_path / "crf.keras")
    model.save(path)
    loaded = keras.models.load_model(path, compile=False, safe_mode=True)
    inputs = [tf.constant(probs), tf.constant(images)]
    out = model(inputs).numpy()
    np.testing.assert_array_equal(loaded(inputs).numpy(), out)
    np.testing.assert_allclose(layer.portable(splat="segment_sum")(*inputs).numpy(), out, atol=1e-5)


def test_frozen_layer_keeps_its_learned_weights():
    _, layer = _crf_model(trainable=True)
    config = layer.get_config()
    config["trainable"] = False
    frozen = dk.crf.DenseCRF.from_config(config)
    frozen.build([(None, 16, 16, 3), (None, 16, 16, 3)])
    assert frozen.learned and len(frozen.weights) == 3 and not frozen.trainable_weights


def test_model_crf_section():
    config = ModelConfig(num_classes=3, crf={"iterations": 2, "bilateral_weight": 5})
    assert config.crf == CRFConfig(iterations=2, bilateral_weight=5)
    assert ModelConfig.from_dict(config.to_dict()) == config
    assert "crf" not in ModelConfig().to_dict()
    assert ModelConfig(crf="{trainable: false, iterations: 4}").crf == CRFConfig(trainable=False, iterations=4)
    for bad, word in [({"iteration": 2}, "valid keys"), ({"iterations": -1}, "iterations"),
                      ({"trainable": "yes"}, "trainable"), (3, "mapping")]:
        with pytest.raises(ValueError, match=word):
            ModelConfig(crf=bad)


@pytest.mark.parametrize("freeze", [False, True])
def test_model_with_crf_on_top_trains(freeze):
    model = tiny_model(crf={"iterations": 2, "freeze_network": freeze})
    images = np.random.default_rng(0).uniform(0, 255, (2, 41, 41, 3)).astype("float32")
    labels = np.random.default_rng(1).integers(0, 3, (2, 41, 41))
    assert model(images).shape == (2, 41, 41, 3)  # log-probabilities at the image size
    crf_names = {"bilateral_weight", "gaussian_weight", "compatibility"}
    names = {w.path.split("/")[-1] for w in model.trainable_weights}
    assert crf_names <= names and (names == crf_names) == freeze
    before = [w.numpy().copy() for w in model.network.weights]
    model.compile(optimizer=keras.optimizers.SGD(0.05),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(images, labels, epochs=1, verbose=0)
    changed = [not np.array_equal(b, w.numpy()) for b, w in zip(before, model.network.weights)]
    assert any(changed) != freeze
    assert model.crf_head.learned_params.bilateral_weight != dk.crf.CRFParams().bilateral_weight


def test_learned_crf_goes_into_exports_through_the_portable_crf(tmp_path):
    """Every export format starts from ``split_crf_head``: the network without the CRF plus the same CRF as stock
    ops with the learned weights and compatibility, equal to the Keras model's CRF (the op). (The three formats
    were exported and verified from a trained CRF for the README; too slow for the suite.)"""
    from deeplab_keras.export import ExportError, serving

    net = tiny_model(crf={"iterations": 2})
    head = net.crf_head
    head.bilateral_weight_variable.assign(5.5)
    head.compatibility.assign(np.array([[0.0, 1.2, 0.7], [1.2, 0.1, 0.9], [0.7, 0.9, 0.0]], "float32"))
    path = tmp_path / "trained.keras"
    net.save(path)
    net = keras.models.load_model(path, compile=False, safe_mode=True)
    plain, hook = serving.split_crf_head(net, None)
    assert plain.crf_head is None and hook.params.bilateral_weight == 5.5 and hook.params.iterations == 2
    assert hook.config["compatibility"] == net.crf_head.learned_compatibility.tolist()
    images = np.random.default_rng(2).uniform(0, 255, (1, 33, 41, 3)).astype("float32").round()
    served = serving.serving_outputs(plain, tf.constant(images), crf=hook.for_runtime("tf"))
    np.testing.assert_allclose(served["probabilities"].numpy(), np.exp(net(images).numpy()), atol=1e-5)
    with pytest.raises(ExportError, match="own CRF"):
        serving.split_crf_head(net, hook)
