"""Dense-CRF op robustness: every bad input gives InvalidArgument naming the problem (eager and tf.function)."""
import numpy as np
import pytest
import tensorflow as tf

import deeplab_keras as dk

GOOD_PROBS = np.full((1, 6, 7, 3), 1 / 3, np.float32)
GOOD_IMAGES = np.zeros((1, 6, 7, 3), np.uint8)


def with_value(value, index=(0, 2, 3, 1)):
    probs = GOOD_PROBS.copy()
    probs[index] = value
    return probs


CASES = {
    "rank3_probs": (dict(probs=GOOD_PROBS[0]), "`probs` must be rank 4"),
    "rank5_images": (dict(images=GOOD_IMAGES[None]), "`images` must"),
    "batch_mismatch": (dict(images=np.zeros((2, 6, 7, 3), np.uint8)), "agree"),
    "height_mismatch": (dict(images=np.zeros((1, 5, 7, 3), np.uint8)), "agree"),
    "width_mismatch": (dict(images=np.zeros((1, 6, 8, 3), np.uint8)), "agree"),
    "four_channels": (dict(images=np.zeros((1, 6, 7, 4), np.uint8)), "3"),
    "zero_labels": (dict(probs=np.zeros((1, 6, 7, 0), np.float32)), "number of labels"),
    "too_many_labels": (dict(probs=np.full((1, 6, 7, 1025), 1e-3, np.float32)), "number of labels"),
    "zero_height": (dict(probs=np.zeros((1, 0, 7, 3), np.float32), images=np.zeros((1, 0, 7, 3), np.uint8)),
                    "H >= 1"),
    "zero_width": (dict(probs=np.zeros((1, 6, 0, 3), np.float32), images=np.zeros((1, 6, 0, 3), np.uint8)),
                   "W >= 1"),
    "nan_probs": (dict(probs=with_value(np.nan)), r"finite .* at \[0, 2, 3, 1\]"),
    "inf_probs": (dict(probs=with_value(np.inf)), "finite"),
    "negative_probs": (dict(probs=with_value(-0.5)), ">= 0"),
    "unnormalised_probs": (dict(probs=GOOD_PROBS * 5), r"sum to 1 .* got 5 at \[0, 0, 0, :\]"),
    "zero_probs": (dict(probs=GOOD_PROBS * 0), r"sum to 1 .* got 0 at"),
    "one_pixel_off": (dict(probs=with_value(0.4)), r"sum to 1 .* at \[0, 2, 3, :\]"),
    "memory_limit": (dict(max_memory=4096), r"needs about .* MiB .* more than the limit of 0\.0 MiB. Run the CRF "
                                            r"on tiles"),
    "negative_iterations": (dict(iterations=-1), "iterations"),
    "huge_iterations": (dict(iterations=100000), "iterations"),
    "negative_bilateral_weight": (dict(bilateral_weight=-1.0), "bilateral_weight"),
    "nan_gaussian_weight": (dict(gaussian_weight=float("nan")), "gaussian_weight"),
    "zero_bilateral_xy_std": (dict(bilateral_xy_std=0.0), "bilateral_xy_std"),
    "negative_bilateral_rgb_std": (dict(bilateral_rgb_std=-3.0), "bilateral_rgb_std"),
    "inf_gaussian_xy_std": (dict(gaussian_xy_std=float("inf")), "gaussian_xy_std"),
    "too_small_rgb_std": (dict(bilateral_rgb_std=1e-4), "too small"),
}


def call(probs=GOOD_PROBS, images=GOOD_IMAGES, **params):
    return dk.crf.dense_crf(probs, images, **params)


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_eager(name):
    kwargs, message = CASES[name]
    with pytest.raises(tf.errors.InvalidArgumentError, match=message):
        call(**kwargs)


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_in_tf_function_with_unknown_shapes(name):
    """Shapes unknown at trace time: the kernel itself must catch every problem."""
    kwargs, message = CASES[name]
    probs = np.asarray(kwargs.get("probs", GOOD_PROBS))
    images = np.asarray(kwargs.get("images", GOOD_IMAGES))
    params = {k: v for k, v in kwargs.items() if k not in ("probs", "images")}

    @tf.function(input_signature=[tf.TensorSpec(None, tf.float32), tf.TensorSpec(None, tf.uint8)])
    def run(p, im):
        return dk.crf.dense_crf(p, im, **params)

    with pytest.raises(tf.errors.InvalidArgumentError, match=message):
        run(probs, images)


@pytest.mark.parametrize("name", ["rank3_probs", "batch_mismatch", "height_mismatch", "four_channels"])
def test_static_shape_problems_fail_at_trace_time(name):
    kwargs, message = CASES[name]
    probs = tf.TensorSpec(np.shape(kwargs.get("probs", GOOD_PROBS)), tf.float32)
    images = tf.TensorSpec(np.shape(kwargs.get("images", GOOD_IMAGES)), tf.uint8)
    with pytest.raises((ValueError, tf.errors.InvalidArgumentError), match=message):
        tf.function(dk.crf.dense_crf).get_concrete_function(probs, images)


def test_float_images_are_rejected_with_a_fix():
    with pytest.raises(tf.errors.InvalidArgumentError, match="uint8.*tf.cast"):
        call(images=GOOD_IMAGES.astype(np.float32))


def test_integer_probs_and_bad_input_type_and_float_iterations():
    with pytest.raises(tf.errors.InvalidArgumentError, match="float"):
        call(probs=np.ones((1, 6, 7, 3), np.int32))
    with pytest.raises(ValueError, match="input_type"):
        call(input_type="softmax")
    with pytest.raises(tf.errors.InvalidArgumentError, match="iterations must be an int"):
        call(iterations=2.5)


def test_unary_and_logits_may_be_negative_but_not_nan():
    assert np.isfinite(call(probs=-GOOD_PROBS, input_type="unary").numpy()).all()
    assert np.isfinite(call(probs=-GOOD_PROBS, input_type="logits").numpy()).all()
    with pytest.raises(tf.errors.InvalidArgumentError, match="finite"):
        call(probs=with_value(np.nan), input_type="logits")


def test_extreme_but_valid_values_stay_finite():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 1e30, (1, 6, 7, 3)).astype(np.float32)
    out = call(probs=logits, input_type="logits", bilateral_weight=1e6, gaussian_weight=1e6).numpy()
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out.sum(-1), 1.0, atol=1e-5)
