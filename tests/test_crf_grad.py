"""The gradient of the dense-CRF op (DenseCrfGrad) against the autodiff gradient of the portable CRF and against
central finite differences, for every input type, with and without a compatibility matrix; bad input."""
import numpy as np
import pytest
import tensorflow as tf

import deeplab_keras as dk

# Small kernels: an 8x8 image spans several lattice cells, so the filters are far from trivial.
PARAMS = dk.crf.CRFParams(iterations=3, bilateral_weight=2.0, bilateral_xy_std=3.0, bilateral_rgb_std=20.0,
                          gaussian_weight=1.5, gaussian_xy_std=1.0)


def _problem(seed, n=1, h=8, w=8, c=3):
    rng = np.random.default_rng(seed)
    logits = (2 * rng.normal(size=(n, h, w, c))).astype("float32")
    images = rng.integers(0, 256, (n, h, w, 3)).astype("uint8")
    upstream = rng.normal(size=(n, h, w, c)).astype("float32")
    compat = (1 - np.eye(c) + 0.3 * rng.normal(size=(c, c))).astype("float32")
    return logits, images, upstream, 0.5 * (compat + compat.T)


def _input(logits, input_type):
    if input_type == "probs":
        return tf.nn.softmax(logits).numpy()
    return -logits if input_type == "unary" else logits


def _grads(crf, x, images, upstream, compat, weights, **kwargs):
    """(loss, d/dx, d/d bilateral_weight, d/d gaussian_weight, d/d compatibility) of sum(crf(...) * upstream)."""
    x = tf.constant(x)
    wb, wg = (tf.constant(w, tf.float32) for w in weights)
    mu = None if compat is None else tf.constant(compat)
    with tf.GradientTape() as tape:
        watched = [x, wb, wg] + ([mu] if mu is not None else [])
        for t in watched:
            tape.watch(t)
        out = crf(x, images, bilateral_weight=wb, gaussian_weight=wg, compatibility=mu, **kwargs)
        loss = tf.reduce_sum(out * upstream)
    grads = tape.gradient(loss, watched)
    return [float(loss)] + [g.numpy() for g in grads] + ([None] if mu is None else [])


def _relative_error(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / max(np.abs(np.asarray(b)).max(), 1e-6))


@pytest.mark.parametrize("shape,iterations,with_compat,save", [
    ((1, 8, 8, 3), 3, False, True), ((2, 6, 9, 2), 2, True, False), ((1, 7, 5, 4), 4, True, True)])
def test_gradient_matches_portable_autodiff(shape, iterations, with_compat, save):
    logits, images, upstream, compat = _problem(sum(shape) + iterations, *shape)
    params = dk.crf.CRFParams.resolve(PARAMS, iterations=iterations)
    probs = _input(logits, "probs")
    mu = compat if with_compat else None
    weights = (params.bilateral_weight, params.gaussian_weight)
    op = _grads(lambda *a, **k: dk.crf.dense_crf(*a, params, save_marginals=save, **k), probs, images, upstream,
                mu, weights)
    ref = _grads(lambda *a, **k: dk.crf.dense_crf_portable(*a, params, splat="segment_sum", **k), probs, images,
                 upstream, mu, weights)
    assert abs(op[0] - ref[0]) <= 1e-4 * max(1.0, abs(ref[0]))
    for got, want in zip(op[1:], ref[1:]):
        if want is not None:
            assert _relative_error(got, want) <= 1e-3


@pytest.mark.parametrize("input_type", ["probs", "unary", "logits"])
def test_gradient_matches_finite_differences(input_type):
    logits, images, upstream, compat = _problem(3, 1, 8, 8, 3)
    x = _input(logits, input_type)
    weights = (PARAMS.bilateral_weight, PARAMS.gaussian_weight)
    crf = lambda *a, **k: dk.crf.dense_crf(*a, PARAMS, input_type=input_type, **k)  # noqa: E731
    _, dx, dwb, dwg, dmu = _grads(crf, x, images, upstream, compat, weights)
    rng = np.random.default_rng(7)

    def loss(x=x, wb=weights[0], wg=weights[1], mu=compat):
        out = dk.crf.dense_crf(tf.constant(x, tf.float32), images, PARAMS, input_type=input_type,
                               bilateral_weight=tf.constant(wb, tf.float32),
                               gaussian_weight=tf.constant(wg, tf.float32), compatibility=mu)
        return float(tf.reduce_sum(tf.cast(out, tf.float64) * upstream.astype("float64")))

    def central(f, eps):  # Richardson-extrapolated central difference (error O(eps^4))
        def step(h):
            return (f(h) - f(-h)) / (2 * h)
        return (4 * step(eps / 2) - step(eps)) / 3

    # Directional derivatives along random directions (probabilities: relative to p and keeping the sum over C,
    # so that p stays a distribution).
    direction = rng.normal(size=x.shape).astype("float32")
    if input_type == "probs":
        direction = x * (direction - np.sum(x * direction, axis=-1, keepdims=True))
    numeric = central(lambda e: loss(x=x + e * direction), 1e-2)
    assert abs(numeric - float(np.sum(dx * direction))) <= 1e-3 * max(abs(numeric), 1.0)
    assert abs(central(lambda e: loss(wb=weights[0] + e), 1e-2) - dwb) <= 1e-3 * max(abs(dwb), 1.0)
    assert abs(central(lambda e: loss(wg=weights[1] + e), 1e-2) - dwg) <= 1e-3 * max(abs(dwg), 1.0)
    d_mu = rng.normal(size=compat.shape).astype("float32")
    numeric = central(lambda e: loss(mu=compat + e * d_mu), 1e-2)
    assert abs(numeric - float(np.sum(dmu * d_mu))) <= 1e-3 * max(abs(numeric), 1.0)


def test_potts_and_saved_marginals_leave_the_forward_pass_unchanged():
    logits, images, _, _ = _problem(5, 2, 8, 8, 3)
    probs = _input(logits, "probs")
    plain = dk.crf.dense_crf(probs, images, PARAMS).numpy()
    np.testing.assert_array_equal(dk.crf.dense_crf(probs, images, PARAMS, save_marginals=True).numpy(), plain)
    potts = dk.crf.dense_crf(probs, images, PARAMS, compatibility=1 - np.eye(3, dtype="float32")).numpy()
    np.testing.assert_allclose(potts, plain, atol=1e-5)


def test_batched_gradient_equals_per_image_gradients():
    logits, images, upstream, compat = _problem(6, 3, 6, 7, 3)
    probs = _input(logits, "probs")
    weights = (PARAMS.bilateral_weight, PARAMS.gaussian_weight)
    crf = lambda *a, **k: dk.crf.dense_crf(*a, PARAMS, **k)  # noqa: E731
    batch = _grads(crf, probs, images, upstream, compat, weights)
    singles = [_grads(crf, probs[i:i + 1], images[i:i + 1], upstream[i:i + 1], compat, weights) for i in range(3)]
    np.testing.assert_allclose(batch[1], np.concatenate([s[1] for s in singles]), atol=1e-6)
    for k in (2, 3, 4):
        np.testing.assert_allclose(batch[k], sum(s[k] for s in singles), rtol=1e-5, atol=1e-5)


def test_bad_gradient_inputs_are_invalid_argument():
    logits, images, upstream, compat = _problem(8, 1, 8, 8, 3)
    probs = tf.constant(_input(logits, "probs"))
    for bad in (np.nan, np.inf):
        with tf.GradientTape() as tape:
            tape.watch(probs)
            out = dk.crf.dense_crf(probs, images, PARAMS)
        with pytest.raises(tf.errors.InvalidArgumentError, match="upstream gradient .* must be finite"):
            tape.gradient(out, probs, output_gradients=tf.fill(out.shape, bad))
    with pytest.raises(tf.errors.InvalidArgumentError, match="compatibility"):
        dk.crf.dense_crf(probs, images, PARAMS, compatibility=np.ones((2, 2), "float32"))
    with pytest.raises(tf.errors.InvalidArgumentError, match="compatibility"):
        dk.crf.dense_crf(probs, images, PARAMS, compatibility=np.full((3, 3), np.nan, "float32"))
    # The backward pass estimates its memory before allocating, like the forward pass.
    lib = dk.crf.load_library()
    args = [probs, images, 3, 2.0, 3.0, 20.0, 1.5, 1.0, tf.zeros([0])]
    refined, marginals = lib.dense_crf(*args, save_marginals=True)
    with pytest.raises(tf.errors.InvalidArgumentError, match="needs about .* for the gradient"):
        lib.dense_crf_grad(*args, refined, marginals, upstream, max_memory=1 << 20)
