"""One logits resize everywhere: corner-aligned ``inference.upsample_logits``; predict, evaluate and an exported
artifact give the same probabilities for the same model and image."""
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from deeplab_keras import evaluate as E
from deeplab_keras import inference
from deeplab_keras import train as T
from deeplab_keras.export import serving
from tests.conftest import tiny_model


def test_upsample_logits_is_corner_aligned():
    logits = np.random.default_rng(0).normal(size=(2, 9, 7, 5)).astype(np.float32)
    out = inference.upsample_logits(logits, (65, 49)).numpy()  # output stride 8: (9 - 1) * 8 + 1, (7 - 1) * 8 + 1
    assert out.shape == (2, 65, 49, 5) and out.dtype == np.float32
    for i, j in [(0, 0), (0, -1), (-1, 0), (-1, -1)]:  # the corners are the input's corners, exactly
        np.testing.assert_array_equal(out[:, i, j], logits[:, i, j])
    np.testing.assert_array_equal(out[:, ::8, ::8], logits)  # logit (i, j) sits on pixel (8 i, 8 j)
    midpoint = (logits[:, 0, 0] + logits[:, 0, 1]) / 2
    np.testing.assert_allclose(out[:, 0, 4], midpoint, atol=1e-6)
    # Not 8k + 1 either: the corners still match; any float dtype comes back as float32.
    half = inference.upsample_logits(tf.constant(logits, tf.float16), (50, 31)).numpy()
    assert half.dtype == np.float32
    for i, j in [(0, 0), (0, -1), (-1, 0), (-1, -1)]:
        np.testing.assert_array_equal(half[:, i, j], logits.astype(np.float16).astype(np.float32)[:, i, j])
    # The half-pixel resize of tf.image.resize puts the logits elsewhere (this is what changed).
    assert not np.allclose(tf.image.resize(logits, (65, 49)).numpy()[:, ::8, ::8], logits, atol=1e-3)


def test_scale_images_uses_the_same_resize():
    images = np.random.default_rng(1).uniform(0, 255, (1, 41, 33, 3)).astype(np.float32)
    half = inference.scale_images(images, 0.5).numpy()
    assert half.shape == (1, 20, 16, 3)  # tf.round: 20.5 -> 20, 16.5 -> 16 (half to even)
    np.testing.assert_array_equal(half[:, ::19, ::15], images[:, ::40, ::32])  # the corners are kept
    np.testing.assert_array_equal(inference.scale_images(images, 1.0).numpy(), images)
    assert inference.scale_images(images, 0.001).shape[1:3] == (1, 1)


def test_one_resize_everywhere():
    assert T.resize_logits is inference.upsample_logits  # training loss and metric
    assert serving.upsample_logits is inference.upsample_logits  # exported graphs
    assert E.predict_probabilities is inference.predict_probabilities  # deeplab-eval
    assert E.Predictor is inference.Predictor


def test_predict_evaluate_and_export_give_the_same_probabilities(tmp_path):
    """deeplab-predict's probabilities and masks, deeplab-eval's traced predictor and an exported ONNX file agree."""
    import keras

    from deeplab_keras.export import onnx as onnx_export
    from deeplab_keras.predict import predict_files

    keras.utils.set_random_seed(4)
    model = tiny_model(3, "resnet50")
    image = np.random.default_rng(2).integers(0, 256, (57, 75, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "img.png")

    predicted = inference.predict_probabilities(model, image[None])  # deeplab-predict's path
    summary = predict_files(model, [str(tmp_path / "img.png")], tmp_path / "out", progress=False)
    assert summary["written"] == ["img"]
    mask = np.asarray(Image.open(tmp_path / "out" / "img.png"))
    np.testing.assert_array_equal(mask, predicted[0].argmax(-1))

    evaluated = inference.Predictor(model)(image[None]).numpy()  # deeplab-eval's path (traced)
    np.testing.assert_allclose(evaluated, predicted, atol=1e-5)

    path = tmp_path / "m.onnx"
    onnx_export.export_onnx(model, str(path), input_size=image.shape[:2], num_samples=1)
    exported = onnx_export.run_onnx(onnx_export.make_session(str(path)), image[None])
    np.testing.assert_allclose(exported["probabilities"], predicted, atol=1e-4)
    assert np.mean(exported["labels"] == predicted.argmax(-1)) >= 0.999
    # The corners of the probability map are the softmax of the corner logits (no half-pixel shift).
    logits = model(image[None].astype(np.float32)).numpy()
    for i, j in [(0, 0), (-1, -1)]:
        np.testing.assert_allclose(exported["probabilities"][0, i, j], tf.nn.softmax(logits[0, i, j]).numpy(),
                                   atol=1e-5)


@pytest.mark.parametrize("scales,flip", [((1.0,), True), ((0.5, 1.0, 1.5), False)])
def test_traced_and_eager_predictions_agree(scales, flip):
    model = tiny_model(3, "resnet50")
    images = np.random.default_rng(3).uniform(0, 255, (2, 45, 53, 3)).astype(np.float32)
    eager = inference.predict_probabilities(model, images, scales, flip)
    traced = inference.Predictor(model, scales, flip)(images).numpy()
    np.testing.assert_allclose(traced, eager, atol=1e-5)
    np.testing.assert_allclose(eager.sum(-1), 1.0, atol=1e-5)
    one = inference.predict_probabilities(model, images[0], scales, flip)  # one [H, W, 3] image
    np.testing.assert_allclose(one, eager[:1], atol=1e-5)


def test_non_finite_images_are_refused_not_turned_into_nan_probabilities():
    model = tiny_model(3)
    images = np.full((1, 33, 41, 3), 100.0, np.float32)
    images[0, 5, 7, 1] = np.nan
    with pytest.raises(ValueError, match=r"1 NaN or Inf values \(shape \(1, 33, 41, 3\)\)"):
        inference.predict_probabilities(model, images)
    images[0, 5, 7, 1] = np.inf
    with pytest.raises(tf.errors.InvalidArgumentError, match="NaN or Inf"):
        inference.Predictor(model)(images)
