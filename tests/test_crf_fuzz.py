"""Hypothesis fuzz of the dense-CRF op: thousands of small random cases, valid and invalid.

Valid cases must give finite probability maps (and match pydensecrf where it is a fair reference); invalid ones
must raise InvalidArgumentError naming the problem, never crash the process.
"""
import numpy as np
import pytest
import tensorflow as tf
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import deeplab_keras as dk

FUZZ = settings(max_examples=2000, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@st.composite
def valid_case(draw):
    n, h, w, c = (draw(st.integers(1, 2)), draw(st.integers(1, 9)), draw(st.integers(1, 9)),
                  draw(st.integers(1, 6)))
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
    input_type = draw(st.sampled_from(["probs", "unary", "logits"]))
    scale = draw(st.sampled_from([1e-3, 1.0, 30.0, 1e4]))
    if input_type == "probs":  # probabilities: summing to 1 over the labels, with exact zeros (clipped to 1e-5)
        values = rng.random((n, h, w, c)) * scale
        values[rng.random(values.shape) < 0.2] = 0.0
        values[values.sum(-1) == 0] = 1.0
        values = values / values.sum(-1, keepdims=True)
    else:
        values = rng.normal(0.0, scale, (n, h, w, c))
    if draw(st.booleans()):
        images = rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8)
    else:
        images = np.full((n, h, w, 3), draw(st.integers(0, 255)), np.uint8)
    params = dict(
        iterations=draw(st.integers(0, 12)),
        bilateral_weight=draw(st.sampled_from([0.0, 0.5, 4.0, 10.0, 1e5])),
        bilateral_xy_std=draw(st.sampled_from([0.05, 1.0, 3.0, 67.0, 1e4])),
        bilateral_rgb_std=draw(st.sampled_from([0.01, 1.0, 3.0, 13.0, 300.0])),
        gaussian_weight=draw(st.sampled_from([0.0, 0.5, 3.0, 1e5])),
        gaussian_xy_std=draw(st.sampled_from([0.05, 1.0, 3.0, 1e4])))
    return values.astype(np.float32), images, input_type, params


def pydensecrf_comparable(values, images, input_type, params):
    """pydensecrf is a fair reference when its int16 lattice keys cannot overflow, no phantom SSE padding points
    exist (H * W % 4 == 0) and the weights are moderate (huge weights amplify float rounding differences)."""
    h, w = images.shape[1:3]
    return (h * w % 4 == 0 and params["bilateral_weight"] <= 10 and params["gaussian_weight"] <= 10
            and params["bilateral_rgb_std"] >= 1.0 and params["bilateral_xy_std"] >= 1.0
            and params["gaussian_xy_std"] >= 1.0)


def pydensecrf_run(values, image, input_type, params):
    import pydensecrf.densecrf as dcrf

    h, w, c = values.shape
    if input_type == "probs":
        unary = -np.log(np.clip(values, 1e-5, 1.0))
    else:
        unary = values if input_type == "unary" else -values
    crf = dcrf.DenseCRF2D(w, h, c)
    crf.setUnaryEnergy(np.ascontiguousarray(unary.transpose(2, 0, 1).reshape(c, -1), dtype=np.float32))
    if params["gaussian_weight"] > 0:
        crf.addPairwiseGaussian(sxy=params["gaussian_xy_std"], compat=params["gaussian_weight"])
    if params["bilateral_weight"] > 0:
        crf.addPairwiseBilateral(sxy=params["bilateral_xy_std"], srgb=params["bilateral_rgb_std"],
                                 rgbim=np.ascontiguousarray(image), compat=params["bilateral_weight"])
    return np.array(crf.inference(params["iterations"])).reshape(c, h, w).transpose(1, 2, 0)


@FUZZ
@given(valid_case())
def test_fuzz_valid_inputs_give_finite_distributions(case):
    values, images, input_type, params = case
    out = dk.crf.dense_crf(values, images, input_type=input_type, **params).numpy()
    assert out.shape == values.shape and out.dtype == np.float32
    assert np.isfinite(out).all()
    assert (out >= 0).all() and (out <= 1 + 1e-6).all()
    np.testing.assert_allclose(out.sum(-1), 1.0, atol=1e-4)
    if pydensecrf_comparable(values, images, input_type, params) and np.abs(values).max() < 1e3:
        event("compared with pydensecrf")
        for i in range(values.shape[0]):
            ref = pydensecrf_run(values[i], images[i], input_type, params)
            np.testing.assert_allclose(out[i], ref, atol=1e-4)


@st.composite
def invalid_case(draw):
    """A valid small case with exactly one defect; returns inputs and a word the error must contain."""
    h, w, c = draw(st.integers(2, 6)), draw(st.integers(2, 6)), draw(st.integers(1, 4))
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
    probs = rng.random((1, h, w, c)) + 0.01
    probs = (probs / probs.sum(-1, keepdims=True)).astype(np.float32)
    images = rng.integers(0, 256, (1, h, w, 3), dtype=np.uint8)
    params = dict(iterations=3, bilateral_weight=4.0, bilateral_xy_std=67.0, bilateral_rgb_std=3.0,
                  gaussian_weight=3.0, gaussian_xy_std=1.0)
    defect = draw(st.sampled_from(["nan", "inf", "negative", "weight", "std", "iterations", "rank", "mismatch",
                                   "channels", "labels0", "labels_many", "empty", "dtype", "tiny_std", "sum"]))
    where = tuple(int(rng.integers(0, s)) for s in probs.shape)
    if defect == "nan":
        probs[where], word = np.nan, "finite"
    elif defect == "inf":
        probs[where], word = draw(st.sampled_from([np.inf, -np.inf])), "finite"
    elif defect == "negative":
        probs[where], word = -draw(st.floats(1e-6, 1e6)), ">= 0"
    elif defect == "sum":
        probs[where[:3]] *= draw(st.sampled_from([0.0, 0.5, 1.05, 5.0, 1e3]))  # one pixel off
        word = "sum to 1"
    elif defect == "weight":
        key = draw(st.sampled_from(["bilateral_weight", "gaussian_weight"]))
        params[key], word = draw(st.sampled_from([-1.0, -1e-6, np.nan, np.inf, 1e7])), key
    elif defect == "std":
        key = draw(st.sampled_from(["bilateral_xy_std", "bilateral_rgb_std", "gaussian_xy_std"]))
        params[key], word = draw(st.sampled_from([0.0, -3.0, np.nan, np.inf])), key
    elif defect == "tiny_std":
        params["bilateral_rgb_std"], word = 1e-4, "bilateral_rgb_std"
    elif defect == "iterations":
        params["iterations"], word = draw(st.sampled_from([-1, -100, 10001])), "iterations"
    elif defect == "rank":
        probs, word = probs[0], "rank 4"
    elif defect == "mismatch":
        axis = draw(st.integers(1, 2))
        images, word = np.concatenate([images, images], axis=axis), "agree"
    elif defect == "channels":
        images, word = np.concatenate([images, images[..., :1]], axis=-1), "3"
    elif defect == "labels0":
        probs, word = probs[..., :0], "labels"
    elif defect == "labels_many":
        probs, word = np.full((1, h, w, 1025), 1 / 1025, np.float32), "labels"
    elif defect == "empty":
        probs, images, word = probs[:, :0], images[:, :0], "H >= 1"
    else:  # dtype
        images, word = images.astype(np.float32), "uint8"
    return probs, images, params, word


@settings(FUZZ, max_examples=600)
@given(invalid_case())
def test_fuzz_invalid_inputs_raise_invalid_argument(case):
    probs, images, params, word = case
    with pytest.raises(tf.errors.InvalidArgumentError, match=word.replace("+", r"\+")):
        dk.crf.dense_crf(probs, images, **params)
