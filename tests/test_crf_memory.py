"""Dense-CRF op memory guard: an estimate before allocating (and again once the lattice is built), a limit the
caller can raise, and an estimate that bounds the real peak."""
import json
import subprocess
import sys
import textwrap

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
    assert 3.5 < big / small < 4.5  # linear in the pixels
    assert memory_estimate([1, 200, 200, 2])[0] < big  # and grows with the labels
    assert memory_estimate([4, 200, 200, 21])[0] == big + 3 * 200 * 200 * 21 * 4  # a batch adds its output only
    assert memory_estimate([1, 200, 200, 21], iterations=0)[0] < big / 3  # no lattices without iterations


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


_PEAK = textwrap.dedent("""
    import ctypes, json, resource, sys, threading, time
    import numpy as np, psutil
    sys.path.insert(0, sys.argv[1])
    import deeplab_keras as dk
    from deeplab_keras.crf import portable
    from tests.test_crf_memory import _inputs
    height, width, noise = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "noise"
    probs, image = _inputs(height, width, noise=noise)
    dk.crf.dense_crf(probs[:, :8, :8], image[:, :8, :8])  # load the library, start the thread pool
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    feats = np.concatenate([np.stack([xs.ravel(), ys.ravel()], 1) / 67.0, image.reshape(-1, 3) / 3.0], 1)
    points = int(portable._Lattice(feats.astype(np.float32), np.zeros(height * width, np.int32)).num_vertices)
    del feats, xs, ys
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    process = psutil.Process()
    before, peak = process.memory_info().rss, 0
    start_max = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    done = threading.Event()
    def sample():
        global peak
        while not done.is_set():
            peak = max(peak, process.memory_info().rss)
            time.sleep(0.0005)
    thread = threading.Thread(target=sample)
    thread.start()
    out = dk.crf.dense_crf(probs, image)
    done.set()
    thread.join()
    end_max = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if end_max > start_max:
        peak = max(peak, end_max)
    print(json.dumps({"growth": peak - before, "points": points,
                      "estimate": dk.crf.memory_estimate(probs.shape, bilateral_points=points)[0],
                      "first_estimate": dk.crf.memory_estimate(probs.shape)[0]}))
""")


@pytest.mark.slow
@pytest.mark.parametrize("height, width, kind", [(750, 1000, "photo"), (300, 400, "noise")])
def test_estimate_bounds_the_measured_peak(height, width, kind):
    proc = subprocess.run([sys.executable, "-c", _PEAK, str(REPO), str(height), str(width), kind],
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    m = json.loads(proc.stdout.strip().splitlines()[-1])
    assert m["growth"] <= m["estimate"], m            # the estimate is an upper bound ...
    assert m["estimate"] <= 2.5 * m["growth"], m      # ... not a wild one
    if kind == "photo":
        assert m["points"] < 2 * height * width and m["growth"] <= m["first_estimate"], m
