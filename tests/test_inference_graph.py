"""Predictor's rewritten inference graph (deeplab_keras.graph_rewrite with weights="live"): the same probabilities
as Keras' own graph, batch norm folded from the CURRENT weights at every call (a Predictor reused after the weights
changed follows them, float32 and bf16), MSC models, subclassed models left plain, training untouched, and the
patches invisible to other threads."""
import threading

import keras
import numpy as np
import pytest
import tensorflow as tf

from deeplab_keras import _keras_compat
from deeplab_keras.graph_rewrite import GraphRewrite
from deeplab_keras.inference import Predictor, predict_probabilities
from deeplab_keras.precision import bf16_supported
from tests.conftest import tiny_model

needs_bf16 = pytest.mark.skipif(not bf16_supported(), reason="this CPU has no avx512_bf16 / AMX")
PLAIN_ONLY_OPS = {"SpaceToBatchND", "BatchToSpaceND", "Rsqrt"}  # Keras' dilated convolution and batch norm


def _images(n=2, size=(57, 73), seed=0):
    return np.random.default_rng(seed).uniform(0, 255, (n, *size, 3)).astype(np.float32)


def _patched(model):
    return [layer.name for layer in _keras_compat.flatten_layers(model) if "call" in vars(layer)]


def _perturb(model, seed):
    """New batch-norm statistics and scales, and new ASPP kernels: what an epoch of training does."""
    rng = np.random.default_rng(seed)
    for layer in _keras_compat.flatten_layers(model):
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.moving_mean.assign(layer.moving_mean.numpy() + rng.normal(0, 0.2, layer.moving_mean.shape))
            layer.moving_variance.assign(layer.moving_variance.numpy() * rng.uniform(0.5, 2, layer.moving_mean.shape))
            layer.gamma.assign(layer.gamma.numpy() * rng.uniform(0.5, 1.5, layer.gamma.shape))
        elif layer.name.startswith("aspp_r"):
            layer.kernel.assign(layer.kernel.numpy() + rng.normal(0, 0.02, layer.kernel.shape))


@pytest.fixture(scope="module")
def model():
    return tiny_model(3, "resnet50", seed=0)


def test_rewritten_predictor_computes_the_plain_graphs_probabilities(model):
    images = _images()
    rewritten, plain = Predictor(model, scales=(0.75, 1.0), flip=True), Predictor(model, graph="plain",
                                                                                   scales=(0.75, 1.0), flip=True)
    assert rewritten.rewrite.stats == {"native_dilated_convs": 2, "folded_batch_norms": 17, "aspp_head": "fused"}
    assert plain.rewrite is None
    got, want = rewritten(images).numpy(), plain(images).numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)  # folding changes the rounding only
    np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))
    np.testing.assert_allclose(predict_probabilities(model, images), predict_probabilities(model, images,
                                                                                           graph="plain"), atol=1e-5)
    ops = {op.type for op in rewritten._fn.get_concrete_function().graph.get_operations()}
    assert not (PLAIN_ONLY_OPS | {"FusedBatchNormV3"}) & ops and "MatMul" in ops, ops  # native, folded, fused
    assert PLAIN_ONLY_OPS <= {op.type for op in plain._fn.get_concrete_function().graph.get_operations()}
    assert not _patched(model)  # the model is unchanged afterwards
    with pytest.raises(ValueError, match="graph='fast' must be one of rewritten, plain"):
        Predictor(model, graph="fast")


def test_a_reused_predictor_follows_the_current_weights(tmp_path):
    """Weights changed between two calls of one Predictor (assign, as training does, and load_weights): its
    rewritten graph, traced once, gives the plain graph's new probabilities, not the old ones."""
    net = tiny_model(3, "resnet50", seed=1)
    images = _images(1, (49, 65), seed=1)
    predictor, plain = Predictor(net), Predictor(net, graph="plain")
    before = predictor(images).numpy()
    _perturb(net, seed=2)
    after, want = predictor(images).numpy(), plain(images).numpy()
    assert np.abs(after - before).max() > 0.05  # the change matters...
    np.testing.assert_allclose(after, want, rtol=0, atol=1e-5)  # ...and the rewritten graph follows it
    other = tiny_model(3, "resnet50", seed=3)
    other.save_weights(tmp_path / "other.weights.h5")
    net.load_weights(tmp_path / "other.weights.h5")
    np.testing.assert_allclose(predictor(images).numpy(), Predictor(other, graph="plain")(images).numpy(),
                               rtol=0, atol=1e-5)
    assert predictor._fn.experimental_get_tracing_count() == 1  # one trace served every call


def test_msc_model(tmp_path):
    net = tiny_model(3, "resnet50", seed=4, msc_scales=(1.0, 0.75))
    images = _images(1, (65, 49), seed=4)
    predictor = Predictor(net)
    assert predictor.rewrite.stats["folded_batch_norms"] == 17
    np.testing.assert_allclose(predictor(images).numpy(), Predictor(net, graph="plain")(images).numpy(),
                               rtol=0, atol=1e-5)
    _perturb(net, seed=5)
    np.testing.assert_allclose(predictor(images).numpy(), Predictor(net, graph="plain")(images).numpy(),
                               rtol=0, atol=1e-5)


@needs_bf16
def test_bf16_predictor_reads_the_float32_models_current_weights():
    net = tiny_model(3, "resnet50", seed=0)
    images = _images(2, (65, 81))
    fast, plain = Predictor(net, precision="bf16"), Predictor(net, precision="bf16", graph="plain")
    fp32 = Predictor(net, graph="plain")
    want, got, old = fp32(images).numpy(), fast(images).numpy(), plain(images).numpy()
    assert np.abs(got - want).max() < 0.05 and np.abs(old - want).max() < 0.05  # bfloat16 rounding
    assert (got.argmax(-1) == want.argmax(-1)).mean() > 0.97 and (got.argmax(-1) == old.argmax(-1)).mean() > 0.97
    _perturb(net, seed=6)
    want, got, old = fp32(images).numpy(), fast(images).numpy(), plain(images).numpy()
    assert np.abs(got - want).max() < 0.05 and (got.argmax(-1) == want.argmax(-1)).mean() > 0.97
    # the plain bf16 copy keeps the weights it was copied with; the rewritten one follows the model
    assert np.abs(old - want).max() > 0.2 and (old.argmax(-1) == want.argmax(-1)).mean() < 0.9
    assert all(w.dtype == "float32" for w in net.weights) and not _patched(net) and not _patched(fast.model)


def test_training_and_other_threads_see_the_plain_model():
    """Inside the rewrite only the entering thread runs the rewritten form, and only in inference: another thread
    calling the model meanwhile gets Keras' own graph, a folded batch norm refuses training=True, and training
    outside the rewrite is untouched."""
    model = tiny_model(3, "resnet50", seed=9)
    weights = model.get_weights()
    x = tf.constant(_images(1, (41, 41), seed=7))
    train = model(x, training=True).numpy()
    model.set_weights(weights)  # a training call updates the batch norms' moving statistics
    plain = model(x, training=False).numpy()
    rewrite = GraphRewrite(model, aspp_head="fused", weights="live")
    seen = {}
    entered, done = threading.Event(), threading.Event()

    def other():
        entered.wait()
        seen["patched"] = bool(_patched(model))
        seen["plain"] = model(x, training=False).numpy()
        seen["train"] = model(x, training=True).numpy()
        model.set_weights(weights)
        done.set()

    thread = threading.Thread(target=other)
    thread.start()
    with rewrite:
        entered.set()
        done.wait()
        rewritten = model(x, training=False).numpy()
        with pytest.raises(RuntimeError, match="inference only"):
            model(x, training=True)
    thread.join()
    assert seen["patched"]  # the other thread ran while the layers were patched...
    np.testing.assert_array_equal(seen["plain"], plain)  # ...and got the plain model, bit for bit
    np.testing.assert_array_equal(seen["train"], train)
    np.testing.assert_allclose(rewritten, plain, rtol=0, atol=1e-4 * np.abs(plain).max())
    assert not _patched(model)
    np.testing.assert_array_equal(model(x, training=True).numpy(), train)


def test_a_subclassed_model_gets_no_folding():
    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.conv = keras.layers.Conv2D(4, 3, padding="same", dilation_rate=2, use_bias=False)
            self.bn = keras.layers.BatchNormalization()

        def call(self, x, training=False):
            return self.bn(self.conv(x), training=training)

    net = Net()
    images = _images(1, (33, 35), seed=8)
    net(images)
    net.bn.moving_mean.assign(np.full(4, 0.5, np.float32))
    predictor = Predictor(net)
    assert predictor.rewrite.stats == {"native_dilated_convs": 1, "folded_batch_norms": 0, "aspp_head": "plain"}
    np.testing.assert_allclose(predictor(images).numpy(), Predictor(net, graph="plain")(images).numpy(), atol=1e-6)
