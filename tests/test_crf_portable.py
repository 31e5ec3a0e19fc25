"""Portable dense CRF (stock TF ops): agreement with pydensecrf and the C++ op, LiteRT and ONNX exports."""
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from deeplab_keras.crf.portable import RUNTIME_SPLAT, crf_postprocess, dense_crf_portable, lattice_key_bits

SAMPLES = ["2007_000032", "2007_000033", "2007_000063", "2008_000009", "2009_000006", "2010_000002",
           "2011_000003"]


def test_portable_crf_is_importable_from_the_crf_package():
    import deeplab_keras as dk
    from deeplab_keras.crf import crf_postprocess as postprocess, dense_crf_portable as portable

    assert portable is dense_crf_portable and postprocess is crf_postprocess
    assert dk.crf.dense_crf_portable is dense_crf_portable
    assert {"dense_crf_portable", "crf_postprocess"} <= set(dk.crf.__all__)


# ----------------------------------------------------------------------------------------------------
# References and inputs
# ----------------------------------------------------------------------------------------------------
def pydensecrf_reference(probs, image, iterations=10, bilateral_weight=4.0, bilateral_xy_std=67.0,
                         bilateral_rgb_std=3.0, gaussian_weight=3.0, gaussian_xy_std=1.0):
    """pydensecrf (Kraehenbuehl's densecrf) on one [H, W, C] probability map and [H, W, 3] uint8 image.

    Compare on images with H * W divisible by 4: otherwise densecrf's SSE lattice construction pads the last
    block of 4 pixels with phantom points at feature (0, ..., 0), whose lattice vertices slightly change the
    blur near that corner of feature space (measured: up to 2e-4 on the filter, 1e-2 on probabilities).
    """
    assert probs.shape[0] * probs.shape[1] % 4 == 0, "see the docstring"
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_softmax

    h, w, c = probs.shape
    crf = dcrf.DenseCRF2D(w, h, c)
    crf.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probs.transpose(2, 0, 1))))
    crf.addPairwiseGaussian(sxy=gaussian_xy_std, compat=gaussian_weight)
    crf.addPairwiseBilateral(sxy=bilateral_xy_std, srgb=bilateral_rgb_std,
                             rgbim=np.ascontiguousarray(image), compat=bilateral_weight)
    return np.array(crf.inference(iterations)).reshape(c, h, w).transpose(1, 2, 0)


def voc_sample(voc_dir, name, num_classes=21, seed=0, scale=1.0):
    """A real VOC image and DeepLab-like probabilities: ground truth at stride 8, upsampled, softened, noisy."""
    root = voc_dir / "VOC2012"
    image = Image.open(root / "JPEGImages" / f"{name}.jpg").convert("RGB")
    label = Image.open(root / "SegmentationClass" / f"{name}.png")
    if scale != 1.0:
        # Even sides: pydensecrf's SSE lattice adds phantom points at feature 0 when H*W % 4 != 0.
        size = (2 * round(image.width * scale / 2), 2 * round(image.height * scale / 2))
        image, label = image.resize(size, Image.BILINEAR), label.resize(size, Image.NEAREST)
    image, label = np.array(image), np.array(label)
    label = np.where(label == 255, 0, label) % num_classes
    h, w = label.shape
    onehot = np.eye(num_classes, dtype=np.float32)[label]
    coarse = tf.image.resize(onehot[None], ((h + 7) // 8, (w + 7) // 8), "area")
    smooth = tf.image.resize(coarse, (h, w), "bilinear")[0].numpy()
    rng = np.random.default_rng(seed)
    probs = tf.nn.softmax(4.0 * smooth + rng.normal(0.0, 0.8, smooth.shape)).numpy()
    return image, probs.astype(np.float32), label


def random_inputs(batch, height, width, classes, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (batch, height, width, 3)).astype(np.uint8)
    images[:, : height // 2, : width // 2] //= 4  # a darker quadrant gives the bilateral kernel an edge
    probs = tf.nn.softmax(rng.normal(0.0, 1.5, (batch, height, width, classes))).numpy()
    return probs.astype(np.float32), images


def agreement(a, b):
    return float(np.mean(a.argmax(-1) == b.argmax(-1)))


# ----------------------------------------------------------------------------------------------------
# Semantics
# ----------------------------------------------------------------------------------------------------
def test_matches_pydensecrf_on_small_voc_samples(voc_samples_dir):
    for name in SAMPLES[:2]:
        image, probs, _ = voc_sample(voc_samples_dir, name, scale=0.25)
        ref = pydensecrf_reference(probs, image)
        out = dense_crf_portable(probs[None], image[None])[0].numpy()
        assert agreement(out, ref) >= 0.999, name
        assert np.abs(out - ref).max() < 1e-3, (name, np.abs(out - ref).max())


@pytest.mark.parametrize("params", [
    dict(),
    dict(iterations=3, bilateral_weight=5.0, bilateral_xy_std=20.0, bilateral_rgb_std=10.0,
         gaussian_weight=1.0, gaussian_xy_std=2.0),
    dict(iterations=5, gaussian_weight=0.0),
    dict(iterations=5, bilateral_weight=0.0, gaussian_xy_std=3.0),
])
def test_matches_pydensecrf_on_random_unaries(params):
    probs, images = random_inputs(1, 36, 54, 6, seed=len(params))
    ref = pydensecrf_reference(probs[0], images[0], **params)
    out = dense_crf_portable(probs, images, **params)[0].numpy()
    assert agreement(out, ref) >= 0.995
    assert np.abs(out - ref).max() < 1e-3, np.abs(out - ref).max()
    # The CRF really changes something here, so the agreement above is not trivial.
    assert agreement(out, probs[0]) < 0.99


@pytest.mark.parametrize("runtime", list(RUNTIME_SPLAT))
def test_runtime_variants_match_pydensecrf_on_a_batch(voc_samples_dir, runtime):
    small = [voc_sample(voc_samples_dir, name, scale=0.2) for name in SAMPLES[3:5]]
    size = min(s[0].shape[0] for s in small), min(s[0].shape[1] for s in small)
    images = np.stack([s[0][: size[0], : size[1]] for s in small])
    probs = np.stack([s[1][: size[0], : size[1]] for s in small])
    out = dense_crf_portable(probs, images, runtime=runtime).numpy()
    for i in range(2):
        ref = pydensecrf_reference(probs[i], images[i])
        assert agreement(out[i], ref) >= 0.999
        assert np.abs(out[i] - ref).max() < 1e-3


def test_exact_gaussian_close_to_pydensecrf(voc_samples_dir):
    image, probs, _ = voc_sample(voc_samples_dir, SAMPLES[1], scale=0.25)
    ref = pydensecrf_reference(probs, image)
    out = dense_crf_portable(probs, image, gaussian_filter="exact").numpy()
    assert agreement(out, ref) >= 0.99


@pytest.mark.slow
def test_agreement_with_pydensecrf_on_full_voc_samples(voc_samples_dir):
    """Issue 8's bar: >= 99 % labels at DeepLab defaults on shared VOC samples (full size; three of the
    seven to keep CI short: benchmarks/crf_portable.py and the report cover all seven)."""
    diffs = []
    crf = tf.function(lambda p, i: dense_crf_portable(p, i, runtime="tf"),
                      input_signature=[tf.TensorSpec([None, None, 21], tf.float32),
                                       tf.TensorSpec([None, None, 3], tf.uint8)])
    for i, name in list(enumerate(SAMPLES))[1:4]:
        image, probs, label = voc_sample(voc_samples_dir, name, seed=i)
        ref = pydensecrf_reference(probs, image)
        out = crf(probs, image).numpy()
        assert agreement(out, ref) >= 0.99, name
        diffs.append(np.abs(out - ref).max())
    assert max(diffs) < 1e-2, diffs


def test_matches_cpp_op(voc_samples_dir):
    from deeplab_keras.crf import dense_crf

    image, probs, _ = voc_sample(voc_samples_dir, SAMPLES[2], scale=0.3)
    probs2, images2 = random_inputs(2, 29, 41, 5, seed=3)
    for p, im in [(probs[None], image[None]), (probs2, images2)]:
        op = dense_crf(p, im).numpy()
        out = dense_crf_portable(p, im).numpy()
        assert agreement(out, op) >= 0.995
        assert np.abs(out - op).max() < 1e-2


def test_batch_equals_single_images_and_rank3():
    probs, images = random_inputs(2, 31, 23, 4, seed=5)
    both = dense_crf_portable(probs, images, iterations=4).numpy()
    for i in range(2):
        single = dense_crf_portable(probs[i], images[i], iterations=4).numpy()
        assert single.shape == (31, 23, 4)
        np.testing.assert_allclose(both[i], single, atol=1e-5)


def test_output_is_distribution_and_zero_iterations_is_softmax_of_log_probs():
    probs, images = random_inputs(1, 17, 19, 3, seed=1)
    out = dense_crf_portable(probs, images).numpy()
    np.testing.assert_allclose(out.sum(-1), 1.0, atol=1e-5)
    assert np.isfinite(out).all()
    np.testing.assert_allclose(dense_crf_portable(probs, images, iterations=0).numpy(), probs, atol=1e-6)


def test_crf_improves_miou_on_voc_samples(voc_samples_dir):
    import keras

    before, after = keras.metrics.MeanIoU(21), keras.metrics.MeanIoU(21)
    for i, name in enumerate(SAMPLES[:3]):
        image, probs, label = voc_sample(voc_samples_dir, name, seed=i, scale=0.3)
        before.update_state(label, probs.argmax(-1))
        after.update_state(label, dense_crf_portable(probs, image, runtime="tf").numpy().argmax(-1))
    assert float(after.result()) >= float(before.result())


def test_errors_name_the_problem():
    probs, images = random_inputs(1, 9, 11, 3)
    with pytest.raises(TypeError, match="images"):
        dense_crf_portable(probs, images.astype(np.float32))
    with pytest.raises(TypeError, match="probs"):
        dense_crf_portable(probs.astype(np.float64), images)
    with pytest.raises(ValueError, match="share N, H, W"):
        dense_crf_portable(probs, images[:, :8])
    with pytest.raises(ValueError, match="iterations"):
        dense_crf_portable(probs, images, iterations=-1)
    with pytest.raises(ValueError, match="bilateral_rgb_std"):
        dense_crf_portable(probs, images, bilateral_rgb_std=0.0)
    with pytest.raises(ValueError, match="splat"):
        dense_crf_portable(probs, images, splat="atomic")
    with pytest.raises(ValueError, match="gaussian_filter"):
        dense_crf_portable(probs, images, gaussian_filter="box")
    with pytest.raises(ValueError, match="H, W, C > 0"):
        dense_crf_portable(probs[:, :0], images[:, :0])
    with pytest.raises(ValueError, match="RGB"):
        dense_crf_portable(probs, np.zeros((1, 9, 11, 4), np.uint8))


def _bad_probs():
    probs, images = random_inputs(1, 9, 11, CLASSES)
    nan, inf, scaled, zero = probs.copy(), probs.copy(), probs * 5, probs * 0
    nan[0, 2, 3, 1] = np.nan
    inf[0, 4, 5, 0] = np.inf
    return images, {"nan": (nan, r"finite and >= 0.*got nan at \[0, 2, 3, 1\]"),
                    "inf": (inf, r"finite.*got inf at \[0, 4, 5, 0\]"),
                    "negative": (probs - 0.5, r">= 0.*got -"),
                    "scaled by 5": (scaled, r"sum to 1 .*got a sum of 5 at \[0, 0, 0, :\]"),
                    "all zero": (zero, r"sum to 1 .*got a sum of 0 at")}


def test_bad_probabilities_are_invalid_argument_like_the_op():
    images, cases = _bad_probs()
    for name, (probs, message) in cases.items():
        with pytest.raises(tf.errors.InvalidArgumentError, match=message):
            dense_crf_portable(probs, images)

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, None], tf.float32),
                                  tf.TensorSpec([None, None, None, 3], tf.uint8)])
    def graph(probs, images):
        return dense_crf_portable(probs, images, iterations=2, runtime="tf")

    for name, (probs, message) in cases.items():  # in a graph: the Assert ops, when it runs
        rule = "finite and >= 0" if name in ("nan", "inf", "negative") else "sum to 1"
        with pytest.raises(tf.errors.InvalidArgumentError, match=rule):
            graph(probs, images)
    good, _ = random_inputs(1, 9, 11, CLASSES)
    np.testing.assert_allclose(graph(good, images).numpy().sum(-1), 1.0, atol=1e-5)


def test_converted_graphs_drop_the_checks():
    """LiteRT and tf2onnx remove tf.debugging.Assert: the converted CRF still runs (builtin ops only) and
    returns NaN for NaN input instead of failing (export verification rejects NaN outputs)."""
    fn = _traced(runtime="litert")
    images, cases = _bad_probs()
    out, _ = _litert(fn)(cases["nan"][0], images)
    assert np.isnan(out).any()
    good, _ = random_inputs(1, 9, 11, CLASSES)
    np.testing.assert_allclose(_litert(fn)(good, images)[0], fn(good, images)["probabilities"].numpy(), atol=1e-4)


def test_lattice_key_bits_fit_int64(voc_samples_dir):
    image, _, _ = voc_sample(voc_samples_dir, SAMPLES[0])
    assert 20 < lattice_key_bits(image[None]) < 50
    # A tiny colour std on a full-range image would overflow int64 keys: refused with a clear message.
    ramp = np.tile(np.linspace(0, 255, 64).astype(np.uint8)[None, :, None], (64, 1, 3))
    assert lattice_key_bits(ramp[None], bilateral_rgb_std=0.01) > 62.5
    with pytest.raises(ValueError, match="bits"):
        dense_crf_portable(np.full((64, 64, 2), 0.5, np.float32), ramp, bilateral_rgb_std=0.01)


# ----------------------------------------------------------------------------------------------------
# Exports
# ----------------------------------------------------------------------------------------------------
CLASSES = 5


def _traced(iterations=2, **kwargs):
    @tf.function(input_signature=[tf.TensorSpec([None, None, None, CLASSES], tf.float32),
                                  tf.TensorSpec([None, None, None, 3], tf.uint8)])
    def crf(probs, images):
        return crf_postprocess(probs, images, iterations=iterations, **kwargs)
    return crf


def _litert(fn):
    from ai_edge_litert.interpreter import Interpreter

    converter = tf.lite.TFLiteConverter.from_concrete_functions([fn.get_concrete_function()], fn)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]  # no Flex, no custom ops
    interpreter = Interpreter(model_content=converter.convert(), num_threads=2)
    inputs = {d["name"]: d["index"] for d in interpreter.get_input_details()}
    probs_in = next(i for n, i in inputs.items() if "probs" in n)
    images_in = next(i for n, i in inputs.items() if "images" in n)

    def run(probs, images):
        interpreter.resize_tensor_input(probs_in, probs.shape)
        interpreter.resize_tensor_input(images_in, images.shape)
        interpreter.allocate_tensors()
        interpreter.set_tensor(probs_in, probs)
        interpreter.set_tensor(images_in, images)
        interpreter.invoke()
        got = [interpreter.get_tensor(d["index"]) for d in interpreter.get_output_details()]
        return next(g for g in got if g.ndim == 4), next(g for g in got if g.ndim == 3)
    return run


def _onnxruntime(fn, threads=2):
    import onnxruntime as ort
    import tf2onnx

    model, _ = tf2onnx.convert.from_function(fn, input_signature=fn.input_signature, opset=17)
    assert not {n.domain for n in model.graph.node} - {"", "ai.onnx"}  # standard ops only
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]

    def run(probs, images):
        got = session.run(None, dict(zip(names, [probs, images])))
        return next(g for g in got if g.ndim == 4), next(g for g in got if g.ndim == 3)
    return run


def _check_runtime(run, fn, shapes=((1, 33, 41), (2, 45, 38))):
    for shape in shapes:  # one converted graph, any image size and batch
        probs, images = random_inputs(*shape, CLASSES, seed=shape[1])
        ref = fn(probs, images)
        out, labels = run(probs, images)
        np.testing.assert_allclose(out, ref["probabilities"].numpy(), atol=1e-4)
        assert np.mean(labels == ref["labels"].numpy()) >= 0.999


@pytest.mark.parametrize("kwargs", [dict(), dict(runtime="litert"),
                                    pytest.param(dict(gaussian_filter="exact"), marks=pytest.mark.slow)],
                         ids=["any-runtime", "litert", "exact-gaussian"])
def test_tflite_builtins_conversion_runs_in_litert(kwargs):
    fn = _traced(**kwargs)
    _check_runtime(_litert(fn), fn)


@pytest.mark.parametrize("kwargs", [dict(runtime="onnx"),
                                    pytest.param(dict(gaussian_filter="exact"), marks=pytest.mark.slow)],
                         ids=["onnx", "exact-gaussian"])
def test_onnx_conversion_runs_in_onnxruntime(kwargs):
    fn = _traced(**kwargs)
    _check_runtime(_onnxruntime(fn), fn)


@pytest.mark.slow
def test_onnx_splat_is_exact_with_many_threads_on_a_real_image(voc_samples_dir):
    """onnxruntime's multi-threaded ScatterND(add) drops updates at this size (1.1 M entries x 21
    channels); the ONNX graph's splat must be exact anyway."""
    import onnxruntime as ort
    import tf2onnx

    from deeplab_keras.crf.lattice import Lattice

    image, _, _ = voc_sample(voc_samples_dir, SAMPLES[2])  # 500x375
    h, w = image.shape[:2]
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    features = np.concatenate([np.stack([xs.ravel(), ys.ravel()], 1) / np.float32(67.0),
                               image.reshape(-1, 3).astype(np.float32) / np.float32(3.0)], 1)
    values = np.random.default_rng(0).random((h * w, 21)).astype(np.float32)

    @tf.function(input_signature=[tf.TensorSpec([None, 5], tf.float32), tf.TensorSpec([None, 21], tf.float32)])
    def splat(f, v):
        lattice = Lattice(f, tf.zeros(tf.shape(f)[:1], tf.int32), splat="cumsum", native_sort=False)
        return lattice.splat_blur(v, lattice.prepare_splat_weights(lattice.weights))

    ref = splat(features, values).numpy()
    model, _ = tf2onnx.convert.from_function(splat, input_signature=splat.input_signature, opset=17)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 4
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    out = session.run(None, dict(zip([i.name for i in session.get_inputs()], [features, values])))[0]
    assert out.shape == ref.shape
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_crf_postprocess_runtime_choices():
    probs, images = random_inputs(1, 20, 24, CLASSES)
    outs = [crf_postprocess(probs, images, iterations=3, runtime=r) for r in (None, "tf", "litert", "onnx")]
    for out in outs[1:]:
        np.testing.assert_allclose(out["probabilities"].numpy(), outs[0]["probabilities"].numpy(), atol=1e-5)
        np.testing.assert_array_equal(out["labels"].numpy(), outs[0]["probabilities"].numpy().argmax(-1))
    with pytest.raises(ValueError, match="runtime"):
        crf_postprocess(probs, images, runtime="coreml")


def test_saved_model_round_trip(tmp_path):
    fn = _traced(runtime="tf")
    module = tf.Module()
    module.crf = fn
    tf.saved_model.save(module, str(tmp_path / "crf"), signatures={"serving_default": fn})
    loaded = tf.saved_model.load(str(tmp_path / "crf"))
    probs, images = random_inputs(1, 21, 27, CLASSES)
    got = loaded.signatures["serving_default"](probs=tf.constant(probs), images=tf.constant(images))
    np.testing.assert_allclose(got["probabilities"].numpy(), fn(probs, images)["probabilities"].numpy(),
                               atol=1e-6)
    assert got["labels"].dtype == tf.int32 and got["labels"].shape == (1, 21, 27)
