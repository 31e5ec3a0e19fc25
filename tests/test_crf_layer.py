"""DenseCRF Keras layer: same result as the op, eager / tf.function / functional model, config and .keras files."""
import keras
import numpy as np
import pytest
import tensorflow as tf

import deeplab_keras as dk

PARAMS = dict(iterations=4, bilateral_weight=5.0, bilateral_xy_std=20.0, bilateral_rgb_std=10.0,
              gaussian_weight=2.0, gaussian_xy_std=1.5)


def inputs(seed=0, n=2, h=17, w=19, c=4):
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 2, (n, h, w, c)).astype(np.float32)
    images = rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8)
    images[:, : h // 2] //= 5
    return tf.nn.softmax(logits).numpy(), images


def test_layer_equals_op_and_accepts_float_images():
    probs, images = inputs()
    expected = dk.crf.dense_crf(probs, images, **PARAMS).numpy()
    layer = dk.crf.DenseCRF(**PARAMS)
    np.testing.assert_array_equal(layer([probs, images]).numpy(), expected)
    np.testing.assert_array_equal(layer([probs, images.astype(np.float32) + 0.3]).numpy(), expected)
    np.testing.assert_array_equal(tf.function(layer)([probs, images]).numpy(), expected)


def test_functional_model_after_resized_softmax_saves_and_loads_safely(tmp_path):
    """The intended use: logits at output stride -> resize -> softmax -> DenseCRF with the input image."""
    image_in = keras.Input((None, None, 3), name="image")
    logits_in = keras.Input((None, None, 4), name="logits")
    resized = keras.layers.Resizing(17, 19, interpolation="bilinear")(logits_in)
    probs = keras.layers.Softmax()(resized)
    refined = dk.crf.DenseCRF(name="crf", **PARAMS)([probs, image_in])
    model = keras.Model([image_in, logits_in], refined)
    assert model.output.shape == (None, 17, 19, 4)

    rng = np.random.default_rng(1)
    logits = rng.normal(0, 2, (2, 3, 3, 4)).astype(np.float32)
    _, images = inputs(seed=1)
    out = model([images.astype(np.float32), logits]).numpy()
    expected = dk.crf.dense_crf(tf.nn.softmax(tf.image.resize(logits, (17, 19))), images, **PARAMS).numpy()
    np.testing.assert_allclose(out, expected, atol=1e-6)

    path = tmp_path / "crf_model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    assert isinstance(loaded.get_layer("crf"), dk.crf.DenseCRF)
    np.testing.assert_array_equal(loaded([images.astype(np.float32), logits]).numpy(), out)


def test_get_config_round_trip():
    layer = dk.crf.DenseCRF(input_type="logits", name="crf_x", **PARAMS)
    config = layer.get_config()
    assert {k: config[k] for k in PARAMS} == PARAMS and config["input_type"] == "logits"
    clone = dk.crf.DenseCRF.from_config(config)
    assert clone.get_config() == config


def test_float32_output_under_mixed_precision():
    probs, images = inputs(seed=2)
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_float16")
    try:
        layer = dk.crf.DenseCRF(**PARAMS)
        out = layer([tf.cast(probs, tf.float16), images])
    finally:
        keras.config.set_dtype_policy(previous)
    assert out.dtype == tf.float32  # computed in float32 from the (float16) probabilities it was given
    rounded = probs.astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(out.numpy(), dk.crf.dense_crf(rounded, images, **PARAMS).numpy())


def test_layer_argument_errors():
    for kwargs, word in [(dict(iterations=-1), "iterations"), (dict(iterations=2.0), "iterations"),
                         (dict(bilateral_xy_std=0), "bilateral_xy_std"), (dict(gaussian_weight=-1), "gaussian_weight"),
                         (dict(input_type="x"), "input_type")]:
        with pytest.raises(ValueError, match=word):
            dk.crf.DenseCRF(**kwargs)
    probs, images = inputs()
    with pytest.raises(ValueError, match=r"\[probs, images\]"):
        dk.crf.DenseCRF()(probs)


def test_layer_is_not_trainable_by_default_but_differentiable():
    probs, images = inputs(seed=3)
    layer = dk.crf.DenseCRF(**PARAMS)
    assert not layer.trainable and not layer.weights and layer.supports_jit is False
    p = tf.Variable(probs)
    with tf.GradientTape() as tape:
        out = layer([p, images])
        loss = tf.reduce_sum(out[..., 0])
    assert np.isfinite(tape.gradient(loss, p).numpy()).all()


def test_layer_saved_by_earlier_versions_loads():
    """Files written before the layer moved to deeplab_keras.crf.layer name the module deeplab_keras.layers.crf;
    the registered name (deeplab_keras>DenseCRF) finds the layer, with its flat parameter keys."""
    config = keras.saving.serialize_keras_object(dk.crf.DenseCRF(name="crf", input_type="logits", **PARAMS))
    assert config["registered_name"] == "deeplab_keras>DenseCRF" and config["module"] == "deeplab_keras.crf.layer"
    config["module"] = "deeplab_keras.layers.crf"
    layer = keras.saving.deserialize_keras_object(config)
    assert isinstance(layer, dk.crf.DenseCRF)
    assert layer.params == dk.crf.CRFParams(**PARAMS) and layer.input_type == "logits" and layer.name == "crf"
