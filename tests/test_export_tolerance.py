"""The float32 tolerance of graphs with the portable CRF is derived from the graph (its measured amplification of
float32-level differences): correct artifacts pass, broken ones (a half-pixel resize, a missing mean-field
iteration) fail, on random and trained models."""
import numpy as np
import pytest
import tensorflow as tf

from deeplab_keras.export import serving, tflite, verify
from deeplab_keras.export.verify import FLOAT32_MAX_DIFF, TOLERANCES, Tolerance, run_checks, synthetic_images
from tests.conftest import tiny_model
from tests.test_export_tflite import train_tiny

ITERATIONS = 10
SIZE = (41, 49)


def _trained_tiny_cpu(steps=40):
    """The tiny_cpu configuration (TINY resnet50, 4 classes) trained for a few steps on synthetic shapes."""
    return train_tiny(4, (49, 49), steps, batch_size=4, data_seed=3, num_examples=24)[0]


@pytest.fixture(scope="module")
def models():
    import keras

    out = {}
    for name, classes, seed in (("random-3", 3, 0), ("random-5", 5, 1), ("random-21", 21, 2)):
        keras.utils.set_random_seed(seed)
        out[name] = tiny_model(classes, "resnet50")
    out["trained-tiny_cpu"] = _trained_tiny_cpu()
    return out


def _half_pixel_outputs(model, images, crf):
    """A broken graph: the logits resized with half-pixel centres instead of corner-aligned."""
    x = tf.constant(images, tf.float32)
    logits = tf.cast(model(x), tf.float32)
    probabilities = crf(tf.nn.softmax(tf.image.resize(logits, SIZE, "bilinear")), x)
    return {"probabilities": probabilities.numpy(), "labels": tf.argmax(probabilities, -1).numpy()}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["random-3", "random-5", "random-21", "trained-tiny_cpu"])
def test_derived_tolerance_passes_correct_and_fails_broken(models, name):
    model = models[name]
    images = synthetic_images(SIZE, 2, seed=7)
    crf = serving.portable_crf(iterations=ITERATIONS).for_runtime("litert")
    reference = serving.reference_outputs(model, images, crf=crf)
    tolerance, derivation = verify.verification_tolerance(TOLERANCES["float32"], model, images, crf)
    assert derivation["amplification"] > 1 and tolerance.max_abs_diff == pytest.approx(
        min(FLOAT32_MAX_DIFF * derivation["amplification"], 1e-2), rel=1e-3)

    # Correct: the same computation traced for another runtime (other splat and sort, grappler's rewrites) and
    # run as a graph; and the Keras graph fed logits that differ at float32-rounding level (another runtime's
    # convolution kernels), here 1e-6 of their range.
    graph = tf.function(lambda x: serving.serving_outputs(model, x, crf=crf.for_runtime("onnx")))
    correct = {"graph": {k: v.numpy() for k, v in graph(tf.constant(images, tf.float32)).items()}}
    x = tf.constant(images, tf.float32)
    logits = tf.cast(model(x), tf.float32)
    noise = 1e-6 * float(tf.reduce_max(tf.abs(logits))) * np.random.default_rng(0).uniform(-1, 1, logits.shape)
    correct["kernels"] = {k: v.numpy() for k, v in serving.postprocess(logits + noise.astype(np.float32), x,
                                                                      crf=crf).items()}
    for label, got in correct.items():
        result = run_checks([(label, reference, got)], tolerance, derivation=derivation)
        assert result["passed"], (label, result["failures"])

    broken = {"missing iteration": serving.reference_outputs(
                  model, images, crf=serving.portable_crf(iterations=ITERATIONS - 1).for_runtime("litert")),
              "half-pixel resize": _half_pixel_outputs(model, images, crf)}
    for label, got in broken.items():
        result = run_checks([(label, reference, got)], tolerance, derivation=derivation)
        assert not result["passed"] and "max |diff|" in result["failures"][0], (label, result)
        assert result["checks"][label]["max_abs_diff"] > 3 * tolerance.max_abs_diff, (label, result)


def test_tolerance_without_crf_stays_the_float32_one(models):
    images = synthetic_images(SIZE, 1, seed=3)
    tolerance, derivation = verify.verification_tolerance(TOLERANCES["float32"], models["random-3"], images, None)
    assert tolerance.max_abs_diff == FLOAT32_MAX_DIFF and derivation["amplification"] == 1.0
    explicit = Tolerance(max_abs_diff=5e-5, min_agreement=0.99)  # --max-diff: kept as given
    assert verify.verification_tolerance(explicit, models["random-3"], images, None) == (explicit, None)


@pytest.mark.slow
def test_litert_artifacts_with_crf(models, tmp_path):
    """Real LiteRT artifacts: a random and a trained model export with the CRF and pass; a .tflite with one
    mean-field iteration less fails the derived tolerance."""
    for name in ("random-3", "trained-tiny_cpu"):  # random-5's CRF does not move on these images (amplification 1)
        report = tflite.export_tflite(models[name], str(tmp_path / f"{name}.tflite"), input_size=SIZE, num_samples=2,
                                      crf=serving.portable_crf(iterations=ITERATIONS))
        verification = report["verification"]
        assert verification["passed"] and verification["tolerance_derivation"]["amplification"] > 1, verification
    model = models["random-3"]
    short = serving.portable_crf(iterations=ITERATIONS - 1).for_runtime("litert")
    content, _ = tflite.convert(model, SIZE, crf=short)
    images = synthetic_images(SIZE, 2)
    crf = serving.portable_crf(iterations=ITERATIONS).for_runtime("litert")
    tolerance, derivation = verify.verification_tolerance(TOLERANCES["float32"], model, images, crf)
    result = run_checks([("tflite", serving.reference_outputs(model, images, crf=crf),
                          tflite.TFLiteRunner(content)(images))], tolerance, derivation=derivation)
    assert not result["passed"] and "max |diff|" in result["failures"][0]
