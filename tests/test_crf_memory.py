"""Dense-CRF op memory guard: an estimate before allocating (and again once the lattice is built), a limit the
caller can raise, and an estimate that bounds the real peak."""
import sys

import numpy as np
import pytest
import tensorflow as tf

import deeplab_keras as dk
from deeplab_keras.crf.ops import MAX_MEMORY_ENV, memory_estimate, memory_limit
from tests.conftest import REPO, VOC_SAMPLES


def test_memory_limit_values(monkeypatch):
    monkeypatch.delenv(MAX_MEMORY_ENV, raising=False)
    assert memory_limit(None) == -1  # the op's default: 80 % of the available memory, read when it runs
    assert memory_limit("1.5G") == 3 << 29 and memory_limit("500M") == 500 << 20 and memory_limit("2gib") == 2 << 30
    assert memory_limit(12345) == 12345 and memory_limit("unlimited") == 0
    for bad in ("lots", "-1G", 0, -5, True):
        with pytest.raises(ValueError, match="max_memory"):
            memory_limit(bad)
    monkeypatch.setenv(MAX_MEMORY_ENV, "64M")
    assert memory_limit(None) == 64 << 20 and memory_limit("1G") == 1 << 30  # the argument wins
    monkeypatch.setenv(MAX_MEMORY_ENV, "plenty")
    with pytest.raises(ValueError, match=MAX_MEMORY_ENV):
        memory_limit(None)


def test_estimate_grows_with_size_and_labels():
    small, limit = memory_estimate([1, 100, 100, 21])
    assert limit > 0  # the machine's available memory could be read
    big, _ = memory_estimate([1, 200, 200, 21])
    bigger, _ = memory_estimate([1, 400, 400, 21])
    assert 3.9 < (bigger - big) / (big - small) < 4.1  # linear in the pixels (plus a constant)
    assert memory_estimate([1, 200, 200, 2])[0] < big  # and grows with the labels
    assert memory_estimate([4, 200, 200, 21])[0] == big + 3 * 200 * 200 * 21 * 4  # a batch adds its output only
    assert memory_estimate([1, 200, 200, 21], iterations=0)[0] - small < (big - small) / 3  # no lattices


def _inputs(height, width, classes=21, noise=False, seed=0):
    rng = np.random.default_rng(seed)
    if noise:
        image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    else:
        from PIL import Image
        path = VOC_SAMPLES / "VOC2012" / "JPEGImages" / "2007_000063.jpg"
        image = np.asarray(Image.open(path).convert("RGB").resize((width, height), Image.BILINEAR))
    logits = rng.normal(0, 2, (1, (height + 7) // 8, (width + 7) // 8, classes)).astype(np.float32)
    probs = tf.nn.softmax(tf.image.resize(logits, (height, width))).numpy()
    return probs, image[None]


def test_limit_fails_before_allocating_and_can_be_raised(monkeypatch):
    probs, images = _inputs(60, 80)
    needed, _ = memory_estimate(probs.shape)
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"60x80 image with 21 labels needs about .* before "
                                                             r"allocating.*max_memory=.*" + MAX_MEMORY_ENV):
        dk.crf.dense_crf(probs, images, max_memory=needed - 1)
    monkeypatch.setenv(MAX_MEMORY_ENV, str(needed - 1))
    with pytest.raises(tf.errors.InvalidArgumentError, match="needs about"):
        dk.crf.dense_crf(probs, images)
    out = dk.crf.dense_crf(probs, images, max_memory=needed)  # the argument raises the limit
    np.testing.assert_allclose(out.numpy().sum(-1), 1.0, atol=1e-5)
    monkeypatch.setenv(MAX_MEMORY_ENV, "unlimited")
    assert np.isfinite(dk.crf.dense_crf(probs, images).numpy()).all()


def test_second_check_once_the_lattice_is_built():
    """A noise image has ~6 bilateral lattice points per pixel instead of the assumed 2: the op re-checks with the
    real lattice before the mean-field buffers and fails there, where a photo of the same size runs."""
    noise_probs, noise = _inputs(60, 80, noise=True)
    probs, photo = _inputs(60, 80)
    limit = memory_estimate(probs.shape)[0] + 1
    assert dk.crf.dense_crf(probs, photo, max_memory=limit).shape == probs.shape

    @tf.function(input_signature=[tf.TensorSpec(None, tf.float32), tf.TensorSpec(None, tf.uint8)])
    def run(p, im):  # shapes unknown when traced: the kernel itself checks
        return dk.crf.dense_crf(p, im, max_memory=limit)

    with pytest.raises(tf.errors.InvalidArgumentError, match="once its lattice was built"):
        run(noise_probs, noise)


@pytest.mark.slow
@pytest.mark.parametrize("height, width, kind", [(750, 1000, "photo"), (300, 400, "noise")])
def test_estimate_bounds_the_measured_peak(height, width, kind):
    """The peak RSS growth of one run (measured by the CRF benchmark's memory worker, in a fresh process) stays
    below the op's estimate with the real lattice size, and not far below it."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from crf_vs_pydensecrf import peak_memory
    finally:
        sys.path.pop(0)
    m = peak_memory("op", width, height, 0, details=True, noise=kind == "noise")
    assert m["peak_mib"] <= m["estimate_mib"], m            # the estimate is an upper bound ...
    assert m["estimate_mib"] <= 2.5 * m["peak_mib"], m      # ... not a wild one
    if kind == "photo":
        assert m["points"] < 2 * height * width and m["peak_mib"] <= m["first_estimate_mib"], m
    else:
        assert m["points"] > 4 * height * width and m["first_estimate_mib"] < m["estimate_mib"], m
