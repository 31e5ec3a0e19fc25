"""Dense-CRF custom op: agreement with pydensecrf (real VOC samples, random inputs), CRF gain, input handling."""
import os
import subprocess
import tempfile
import sys

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

import deeplab_keras as dk

SAMPLES = ["2007_000032", "2007_000033", "2007_000063", "2008_000009", "2009_000006", "2010_000002",
           "2011_000003"]
DEEPLAB = dict(bilateral_weight=4.0, bilateral_xy_std=67.0, bilateral_rgb_std=3.0, gaussian_weight=3.0,
               gaussian_xy_std=1.0)


def pydensecrf_reference(probs, image, iterations=10, bilateral_weight=4.0, bilateral_xy_std=67.0,
                         bilateral_rgb_std=3.0, gaussian_weight=3.0, gaussian_xy_std=1.0, unary=None):
    """pydensecrf (Kraehenbuehl's densecrf) on one [H, W, C] map; ``unary`` [H, W, C] replaces -log(probs).

    Needs H * W % 4 == 0: otherwise densecrf's SSE lattice construction adds phantom lattice points for the
    padding pixels of its last block of 4 (features all 0), which the op (rightly) does not have.
    """
    assert image.shape[0] * image.shape[1] % 4 == 0, "see the docstring"
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_softmax

    h, w, c = probs.shape if probs is not None else unary.shape
    energy = unary.transpose(2, 0, 1).reshape(c, -1) if unary is not None else unary_from_softmax(
        probs.transpose(2, 0, 1))
    crf = dcrf.DenseCRF2D(w, h, c)
    crf.setUnaryEnergy(np.ascontiguousarray(energy, dtype=np.float32))
    if gaussian_weight > 0:
        crf.addPairwiseGaussian(sxy=gaussian_xy_std, compat=gaussian_weight)
    if bilateral_weight > 0:
        crf.addPairwiseBilateral(sxy=bilateral_xy_std, srgb=bilateral_rgb_std, rgbim=np.ascontiguousarray(image),
                                 compat=bilateral_weight)
    return np.array(crf.inference(iterations)).reshape(c, h, w).transpose(1, 2, 0)


def voc_sample(voc_dir, name, num_classes=21, seed=0):
    """A real VOC image, its labels (255 = ignore) and DeepLab-like probabilities.

    The ground truth (ignore band filled with the nearest label) is blurred (sigma 12 px, a network's blurry
    boundaries), averaged to output stride 8, turned into noisy logits and upsampled bilinearly: mIoU about 0.79
    before the CRF, like a real DeepLab on these images.
    """
    from scipy import ndimage

    root = voc_dir / "VOC2012"
    image = np.array(Image.open(root / "JPEGImages" / f"{name}.jpg").convert("RGB"))
    label = np.array(Image.open(root / "SegmentationClass" / f"{name}.png"))
    nearest = ndimage.distance_transform_edt(label == 255, return_distances=False, return_indices=True)
    filled = label[tuple(nearest)]
    h, w = label.shape
    onehot = ndimage.gaussian_filter(np.eye(num_classes, dtype=np.float32)[filled], (12, 12, 0))
    coarse = tf.image.resize(onehot[None], ((h + 7) // 8, (w + 7) // 8), "area")
    rng = np.random.default_rng(seed)
    logits = 4.0 * coarse + rng.normal(0.0, 0.5, coarse.shape).astype(np.float32)
    probs = tf.nn.softmax(tf.image.resize(logits, (h, w), "bilinear"))[0].numpy()
    return image, probs.astype(np.float32), label


def confusion(label, pred, num_classes=21):
    keep = label != 255
    return np.bincount(num_classes * label[keep].astype(np.int64) + pred[keep], minlength=num_classes ** 2
                       ).reshape(num_classes, num_classes)


def miou(cm):
    inter = np.diag(cm).astype(np.float64)
    union = cm.sum(0) + cm.sum(1) - inter
    return float(np.mean(inter[union > 0] / union[union > 0]))


def random_case(rng, height, width, classes, peaked=True):
    """Random image with a few flat regions + noise, and random probabilities (peaked like a network's)."""
    image = rng.integers(0, 256, (height, width, 3)).astype(np.int32)
    image[: height // 2] = image[: height // 2] // 8 + 40
    image[:, width // 3: 2 * width // 3] = 200 + image[:, width // 3: 2 * width // 3] // 16
    logits = rng.normal(0.0, 2.0 if peaked else 0.5, (height, width, classes))
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    return image.astype(np.uint8), (probs / probs.sum(-1, keepdims=True)).astype(np.float32)


# ----------------------------------------------------------------------------------------------------
# Agreement with pydensecrf and the CRF's effect on the real VOC samples
# ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def voc_results(voc_samples_dir):
    results = []
    for i, name in enumerate(SAMPLES):
        image, probs, label = voc_sample(voc_samples_dir, name, seed=i)
        ours = dk.crf.dense_crf(probs[None], image[None], iterations=10, **DEEPLAB).numpy()[0]
        ref = pydensecrf_reference(probs, image, iterations=10, **DEEPLAB)
        results.append((name, label, probs, ours, ref))
    return results


@pytest.mark.slow
def test_voc_samples_agree_with_pydensecrf(voc_results):
    total = agree = 0
    for name, _, _, ours, ref in voc_results:
        same = ours.argmax(-1) == ref.argmax(-1)
        diff = np.abs(ours - ref)
        print(f"{name}: labels agree {same.mean():.6f}, |diff| max {diff.max():.2e} mean {diff.mean():.2e}")
        assert same.mean() >= 0.995, name
        assert diff.max() < 1e-3, name
        total, agree = total + same.size, agree + same.sum()
    assert agree / total >= 0.999


@pytest.mark.slow
def test_crf_improves_miou_on_voc_samples(voc_results):
    before = sum(confusion(label, probs.argmax(-1)) for _, label, probs, _, _ in voc_results)
    after = sum(confusion(label, ours.argmax(-1)) for _, label, _, ours, _ in voc_results)
    print(f"mIoU over the 7 VOC samples: before CRF {miou(before):.4f}, after {miou(after):.4f}")
    assert miou(after) > miou(before)
    # The refined maps are a real change, not a no-op.
    assert any((ours.argmax(-1) != probs.argmax(-1)).mean() > 0.005 for _, _, probs, ours, _ in voc_results)


@pytest.mark.parametrize("seed,shape,params,iterations", [
    (0, (48, 64, 21), DEEPLAB, 10),
    (1, (40, 52, 5), dict(bilateral_weight=10.0, bilateral_xy_std=20.0, bilateral_rgb_std=13.0,
                          gaussian_weight=3.0, gaussian_xy_std=3.0), 5),
    (2, (33, 36, 3), dict(bilateral_weight=5.0, bilateral_xy_std=8.0, bilateral_rgb_std=20.0,
                          gaussian_weight=0.0, gaussian_xy_std=1.0), 3),
    (3, (20, 30, 2), dict(bilateral_weight=0.0, bilateral_xy_std=67.0, bilateral_rgb_std=3.0,
                          gaussian_weight=6.0, gaussian_xy_std=2.0), 20),
    (4, (65, 44, 8), DEEPLAB, 1),
    # Gaussian kernel alone at power-of-two stds (the op's exact per-column stencil path; H > 25 exercises the
    # shared interior rows) and at a std that takes the lattice path.
    (5, (70, 34, 4), dict(DEEPLAB, bilateral_weight=0.0, gaussian_weight=5.0, gaussian_xy_std=1.0), 7),
    (6, (61, 40, 3), dict(DEEPLAB, bilateral_weight=0.0, gaussian_weight=5.0, gaussian_xy_std=0.5), 4),
    (7, (52, 36, 3), dict(bilateral_weight=2.0, bilateral_xy_std=30.0, bilateral_rgb_std=10.0,
                          gaussian_weight=5.0, gaussian_xy_std=1.5), 4),
])
def test_random_inputs_agree_with_pydensecrf(seed, shape, params, iterations):
    rng = np.random.default_rng(seed)
    image, probs = random_case(rng, *shape)
    ours = dk.crf.dense_crf(probs[None], image[None], iterations=iterations, **params).numpy()[0]
    ref = pydensecrf_reference(probs, image, iterations=iterations, **params)
    assert (ours.argmax(-1) == ref.argmax(-1)).mean() >= 0.995
    np.testing.assert_allclose(ours, ref, atol=2e-5)


LABEL_COUNTS = (1, 2, 21, 33, 60, 182)  # the last block of 8 labels partly filled; 1 to 23 blocks


@pytest.mark.parametrize("labels", LABEL_COUNTS)
def test_label_counts_agree_with_pydensecrf(labels):
    """The last, partly filled block of 8 labels is read with one vector load and a blend where memory follows
    the row, element by element at the end of a range (the image's last pixel): both must give pydensecrf's
    result. 24 x 30 pixels: several ranges when the op runs on more than one thread."""
    rng = np.random.default_rng(100 + labels)
    image, probs = random_case(rng, 24, 30, labels)
    ours = dk.crf.dense_crf(probs[None], image[None], iterations=5).numpy()[0]
    ref = pydensecrf_reference(probs, image, iterations=5)
    assert (ours.argmax(-1) == ref.argmax(-1)).mean() >= 0.995
    np.testing.assert_allclose(ours, ref, atol=2e-5)


def test_random_unaries_batch_agree_with_pydensecrf():
    """A batch of 3 images with uniform-noise unaries (weak, so the pairwise terms dominate)."""
    rng = np.random.default_rng(7)
    cases = [random_case(rng, 36, 44, 6, peaked=False) for _ in range(3)]
    images = np.stack([c[0] for c in cases])
    probs = np.stack([c[1] for c in cases])
    ours = dk.crf.dense_crf(probs, images).numpy()
    for i in range(3):
        ref = pydensecrf_reference(probs[i], images[i])
        diff = np.abs(ours[i] - ref)
        print(f"random unaries image {i}: agree {(ours[i].argmax(-1) == ref.argmax(-1)).mean():.5f}, "
              f"|diff| max {diff.max():.2e} mean {diff.mean():.2e}")
        assert (ours[i].argmax(-1) == ref.argmax(-1)).mean() >= 0.995
        assert diff.max() < 1e-4


# ----------------------------------------------------------------------------------------------------
# Input kinds, batching, threads
# ----------------------------------------------------------------------------------------------------
def test_input_types_unary_and_logits_match_probs():
    rng = np.random.default_rng(3)
    image, _ = random_case(rng, 24, 20, 4)
    logits = rng.normal(0.0, 1.5, (24, 20, 4)).astype(np.float32)  # probabilities well above the 1e-5 clip
    probs = tf.nn.softmax(logits).numpy()
    from_probs = dk.crf.dense_crf(probs[None], image[None]).numpy()
    from_logits = dk.crf.dense_crf(logits[None], image[None], input_type="logits").numpy()
    from_unary = dk.crf.dense_crf(-np.log(probs)[None], image[None], input_type="unary").numpy()
    np.testing.assert_allclose(from_logits, from_probs, atol=2e-5)
    np.testing.assert_allclose(from_unary, from_probs, atol=2e-5)
    ref = pydensecrf_reference(None, image, unary=-logits)
    np.testing.assert_allclose(from_logits[0], ref, atol=2e-5)


def test_zero_iterations_is_the_normalised_clipped_input():
    rng = np.random.default_rng(4)
    image, probs = random_case(rng, 9, 11, 3)
    probs[0, 0] = [0.0, 0.75, 0.25]  # an exact zero: clipped to [1e-5, 1] like unary_from_softmax
    out = dk.crf.dense_crf(probs[None], image[None], iterations=0).numpy()[0]
    clipped = np.clip(probs, 1e-5, 1.0)
    np.testing.assert_allclose(out, clipped / clipped.sum(-1, keepdims=True), atol=1e-6)


def test_outputs_are_distributions_and_batch_items_are_independent():
    rng = np.random.default_rng(5)
    cases = [random_case(rng, 17, 23, 7) for _ in range(3)]
    images, probs = np.stack([c[0] for c in cases]), np.stack([c[1] for c in cases])
    batched = dk.crf.dense_crf(probs, images).numpy()
    np.testing.assert_allclose(batched.sum(-1), 1.0, atol=1e-5)
    for i in range(3):
        single = dk.crf.dense_crf(probs[i:i + 1], images[i:i + 1]).numpy()
        np.testing.assert_array_equal(batched[i:i + 1], single)


def test_tf_function_dynamic_shapes_and_tensor_parameters():
    rng = np.random.default_rng(6)
    image, probs = random_case(rng, 16, 12, 3)

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, None], tf.float32),
                                  tf.TensorSpec([None, None, None, 3], tf.uint8), tf.TensorSpec([], tf.float32)])
    def run(p, im, weight):
        return dk.crf.dense_crf(p, im, iterations=tf.constant(4), bilateral_weight=weight)

    out = run(probs[None], image[None], tf.constant(4.0)).numpy()
    np.testing.assert_allclose(out, dk.crf.dense_crf(probs[None], image[None], iterations=4).numpy(), atol=1e-6)
    assert run.get_concrete_function().structured_outputs.shape.rank == 4


def op_in_subprocess(probs, image, threads=0, env=None):
    """``dense_crf(probs[None], image[None])`` in a fresh process: its own intra-op pool size (threads > 0) and
    kernel choice (``env``)."""
    script = (
        "import sys, numpy as np, tensorflow as tf\n"
        "if int(sys.argv[4]): tf.config.threading.set_intra_op_parallelism_threads(int(sys.argv[4]))\n"
        "import deeplab_keras as dk\n"
        "np.save(sys.argv[3], dk.crf.dense_crf(np.load(sys.argv[1]), np.load(sys.argv[2])).numpy())\n")
    paths = [os.path.join(tempfile.mkdtemp(), n) for n in ("p.npy", "im.npy", "out.npy")]
    np.save(paths[0], probs[None])
    np.save(paths[1], image[None])
    subprocess.run([sys.executable, "-c", script, *paths, str(threads)], check=True, capture_output=True,
                   timeout=300, env=env)
    return np.load(paths[2])


def test_result_does_not_depend_on_the_thread_count():
    """The op splits the work by its intra-op thread count; 1- and 3-thread processes must give identical bits.

    256x192 pixels: large enough for the lattice build to insert pixel ranges in parallel and merge them.
    """
    rng = np.random.default_rng(8)
    image, probs = random_case(rng, 256, 192, 21)
    here = dk.crf.dense_crf(probs[None], image[None]).numpy()
    for threads in (1, 3):
        np.testing.assert_array_equal(op_in_subprocess(probs, image, threads), here, err_msg=f"{threads} threads")


def test_portable_kernels_match_the_avx2_kernels():
    """The plain x86-64 kernels (what a CPU without AVX2/FMA runs) give the same result up to FMA rounding."""
    rng = np.random.default_rng(10)
    image, probs = random_case(rng, 40, 36, 21)
    here = dk.crf.dense_crf(probs[None], image[None]).numpy()
    generic = op_in_subprocess(probs, image, env=dict(os.environ, DEEPLAB_KERAS_CRF_GENERIC="1"))
    np.testing.assert_allclose(generic, here, atol=1e-5)


def test_portable_kernels_match_the_avx2_kernels_for_any_label_count():
    """The plain x86-64 and the AVX2 kernels agree up to FMA rounding for every block filling (one process runs
    the plain kernels on all the label counts)."""
    rng = np.random.default_rng(11)
    cases = [random_case(rng, 20, 26, labels) for labels in LABEL_COUNTS]
    directory = tempfile.mkdtemp()
    for i, (image, probs) in enumerate(cases):
        np.save(os.path.join(directory, f"p{i}.npy"), probs[None])
        np.save(os.path.join(directory, f"im{i}.npy"), image[None])
    script = (
        "import os, sys, numpy as np\n"
        "import deeplab_keras as dk\n"
        "d = sys.argv[1]\n"
        "for i in range(int(sys.argv[2])):\n"
        "    out = dk.crf.dense_crf(np.load(os.path.join(d, f'p{i}.npy')), np.load(os.path.join(d, f'im{i}.npy')))\n"
        "    np.save(os.path.join(d, f'out{i}.npy'), out.numpy())\n")
    subprocess.run([sys.executable, "-c", script, directory, str(len(cases))], check=True, capture_output=True,
                   timeout=300, env=dict(os.environ, DEEPLAB_KERAS_CRF_GENERIC="1"))
    for i, (image, probs) in enumerate(cases):
        here = dk.crf.dense_crf(probs[None], image[None]).numpy()
        np.testing.assert_allclose(np.load(os.path.join(directory, f"out{i}.npy")), here, atol=1e-5,
                                   err_msg=f"{LABEL_COUNTS[i]} labels")


def test_empty_batch_returns_empty():
    out = dk.crf.dense_crf(np.zeros((0, 5, 6, 3), np.float32), np.zeros((0, 5, 6, 3), np.uint8))
    assert out.shape == (0, 5, 6, 3)


def test_differentiable():
    """The op has a registered gradient (checked in depth in test_crf_grad.py)."""
    rng = np.random.default_rng(9)
    image, probs = random_case(rng, 8, 8, 2)
    p = tf.Variable(probs[None])
    with tf.GradientTape() as tape:
        out = dk.crf.dense_crf(p, image[None])
        loss = tf.reduce_sum(out[..., 0])
    grad = tape.gradient(loss, p)
    assert grad.shape == p.shape and np.isfinite(grad.numpy()).all() and np.abs(grad.numpy()).max() > 0
