"""The training recipe: loss, LR multipliers, weight decay, poly schedule, frozen BN, MSC, configs, precision."""
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import deeplab_keras as dk
from deeplab_keras import train as T
from deeplab_keras._keras_compat import flatten_layers

TINY = dict(num_classes=3, backbone="resnet50", width_multiplier=0.125, stage_blocks=[1, 1, 1, 1])


def tiny_config(tmp_path, *sets):
    """A tiny synthetic run with ``sets`` ("section.key=value") applied."""
    values = {"model": TINY,
              "data": dict(dataset="synthetic", synthetic_images=8, synthetic_val_images=2, synthetic_size=[41, 41],
                           crop_size=[33, 33], batch_size=2),
              "schedule": dict(steps=2, steps_per_epoch=1, checkpoint_every=0, validation_every=0),
              "optimizer": dict(base_lr=1e-3),
              "runtime": dict(run_dir=str(tmp_path / "run"), tensorboard=False, plot=False, verbose=0, seed=3)}
    return T.TrainConfig.from_dict(values).with_overrides(list(sets))


def random_data(n=6, size=41, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    labels = rng.integers(0, classes, (n, size, size), dtype=np.uint8)
    labels[:, :3] = 255
    return tf.data.Dataset.from_tensor_slices({"image": images, "label": labels})


# ---------------------------------------------------------------------------------------------- loss
def _np_ce(labels, logits, ignore=255):
    logits = logits - logits.max(-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    valid = labels != ignore
    picked = np.take_along_axis(logp, np.where(valid, labels, 0)[..., None].astype(int), -1)[..., 0]
    return -(picked * valid).sum(), valid.sum()


def test_loss_ignores_255_and_normalises_by_valid_pixels():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 9, 9, 4)).astype("float32")
    labels = rng.integers(0, 4, (2, 9, 9)).astype("uint8")
    labels[0, :4] = 255
    s, c = T.segmentation_loss(labels, logits)
    ref_s, ref_c = _np_ce(labels, logits)
    assert float(c) == ref_c == 2 * 81 - 36
    np.testing.assert_allclose(float(s), ref_s, rtol=1e-5)
    # Same as Keras' sparse CE (no ignored pixels) when nothing is ignored.
    labels2 = rng.integers(0, 4, (2, 9, 9)).astype("uint8")
    s2, c2 = T.segmentation_loss(labels2, logits)
    keras_ce = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(labels2, logits)
    np.testing.assert_allclose(float(s2 / c2), float(keras_ce), rtol=1e-5)


def test_loss_upsamples_logits_to_labels_corner_aligned():
    # logits 3x3 -> labels 9x9 (OS 4 geometry: 4 * (3 - 1) + 1 = 9): corner pixels take the corner logits.
    logits = np.zeros((1, 3, 3, 2), "float32")
    logits[0, :, :, 1] = np.arange(9).reshape(3, 3)
    up = T.resize_logits(logits, (9, 9)).numpy()[0, :, :, 1]
    assert up[0, 0] == 0 and up[-1, -1] == 8 and up[0, 4] == 1 and up[4, 4] == 4
    np.testing.assert_allclose(up[0, 2], 0.5)
    labels = np.ones((1, 9, 9), "uint8")
    s_up, c_up = T.segmentation_loss(labels, logits, upsample_logits=True)
    s_dn, c_dn = T.segmentation_loss(labels, logits, upsample_logits=False)
    assert float(c_up) == 81 and float(c_dn) == 9
    ref, _ = _np_ce(np.ones((1, 3, 3), "uint8"), logits)
    np.testing.assert_allclose(float(s_dn), ref, rtol=1e-5)


def test_miou_metric_matches_keras_meaniou_on_resized_logits():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(2, 5, 5, 3)).astype("float32")
    labels = rng.integers(0, 3, (2, 17, 17)).astype("uint8")
    labels[:, 0] = 255
    metric = T.SegmentationMeanIoU(3)
    metric.update_state(labels, logits)
    pred = np.argmax(T.resize_logits(logits, (17, 17)).numpy(), -1)
    ref = keras.metrics.MeanIoU(3, ignore_class=255)
    ref.update_state(labels.astype("int32"), pred)
    np.testing.assert_allclose(float(metric.result()), float(ref.result()), rtol=1e-6)


# ---------------------------------------------------------------------------------------------- optimizer
def test_scaled_sgd_equals_per_variable_learning_rates():
    a = keras.Variable(np.ones(3, "float32"), name="kernel")
    b = keras.Variable(np.ones(3, "float32"), name="bias")
    opt = T.ScaledSGD(0.1, momentum=0.9, multipliers=[["bias", 10.0]])
    grads = [tf.constant([1.0, 2.0, 3.0]), tf.constant([1.0, 2.0, 3.0])]
    ref_a, ref_b, va, vb = np.ones(3), np.ones(3), np.zeros(3), np.zeros(3)
    for _ in range(3):
        opt.apply(grads, [a, b])
        g = np.array([1.0, 2.0, 3.0])
        va = 0.9 * va - 0.1 * g
        vb = 0.9 * vb - 1.0 * g
        ref_a, ref_b = ref_a + va, ref_b + vb
    np.testing.assert_allclose(a.numpy(), ref_a, rtol=1e-6)
    np.testing.assert_allclose(b.numpy(), ref_b, rtol=1e-6)
    assert opt.multiplier(b) == 10.0 and opt.multiplier(a) == 1.0
    restored = T.ScaledSGD.from_config(opt.get_config())
    assert restored.multipliers == [["bias", 10.0]]


def test_classifier_pattern_selects_the_logit_layers_only():
    from deeplab_keras.training.optimizer import classifier_pattern
    import re

    pattern = classifier_pattern(T.TrainConfig())  # the training default: the model's CLASSIFIER_PATTERN
    resnet = dk.DeepLabV2(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in TINY.items()})
    matched = [v.path for v in resnet.trainable_variables if re.search(pattern, v.path)]
    assert sorted(matched) == sorted(v.path for v in resnet.classifier_variables)  # ResNet: all ASPP convs
    vgg = dk.DeepLabV2(num_classes=3, backbone="vgg16", aspp="largefov", width_multiplier=0.0625)
    matched = [v.path for v in vgg.trainable_variables if re.search(pattern, v.path)]
    assert matched == ["aspp/fc8_r12/kernel", "aspp/fc8_r12/bias"]  # VGG: fc8 only (fc6/fc7 at 1x)


def test_one_fit_step_is_the_caffe_update(tmp_path):
    """One step of train(): w1 = w0 - lr * mult * (dCE/dw + wd * w) for conv kernels (momentum 0 at step 1)."""
    cfg = tiny_config(tmp_path, "schedule.steps=1", "optimizer.weight_decay=0.01", "optimizer.base_lr=0.05",
                      "data.flip=false", "data.scale_range=null", "data.crop_size=41,41")
    data = random_data(2, 41)
    keras.utils.set_random_seed(cfg.runtime.seed)
    net = T.build_model(cfg)
    for layer in flatten_layers(net):  # train() freezes BN too (train_bn=False)
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False
    w0 = [v.numpy().copy() for v in net.trainable_variables]
    bns = [layer for layer in flatten_layers(net) if isinstance(layer, keras.layers.BatchNormalization)]
    bn0 = [[np.asarray(w).copy() for w in b.weights] for b in bns]
    images, labels = next(iter(T.make_train_stream(data, cfg)))
    # reference gradient of the CE (mean over valid pixels) at w0
    with tf.GradientTape() as tape:
        s, c = T.segmentation_loss(labels, net(images, training=True))
        ce = s / c
    grads = tape.gradient(ce, net.trainable_variables)
    paths = [v.path for v in net.trainable_variables]
    result = T.train(cfg, model=net, train_data=data)
    assert result.model is net
    opt = T.ScaledSGD(0.0, multipliers=[[dk.models.CLASSIFIER_PATTERN, 10.0], [r"(^|/)bias(:\d+)?$", 2.0]])
    checked = 0
    for v, g, before, path in zip(net.trainable_variables, grads, w0, paths):
        mult = opt.multiplier(v)
        decay = cfg.optimizer.weight_decay * before if (path.endswith("kernel") and before.ndim == 4) else 0.0
        expected = before - cfg.optimizer.base_lr * mult * (g.numpy() + decay)
        np.testing.assert_allclose(v.numpy(), expected, rtol=2e-4, atol=2e-6, err_msg=path)
        checked += 1
    assert checked == len(paths) and any(opt.multiplier(v) == 20.0 for v in net.trainable_variables)
    # batch norm frozen: not trained, statistics not updated
    assert bns and all(not b.trainable for b in bns)
    for b, before in zip(bns, bn0):
        for w, w0_ in zip(b.weights, before):
            np.testing.assert_array_equal(np.asarray(w), w0_)


def test_msc_loss_is_sum_of_scale_losses_and_fused(tmp_path):
    keras.utils.set_random_seed(0)
    net = dk.DeepLabV2(num_classes=3, backbone="resnet50", width_multiplier=0.125, stage_blocks=(1, 1, 1, 1),
                       msc_scales=(1.0, 0.75, 0.5))
    trainer = T.SegmentationTrainer(net, 3, msc=True, weight_decay=0.0)
    images = tf.random.uniform((2, 49, 49, 3), 0, 255, seed=1)
    labels = tf.cast(tf.random.uniform((2, 49, 49), 0, 3, tf.int32, seed=2), tf.uint8)
    out = trainer(images, training=True)
    assert sorted(out) == ["fused", "scale_0.5", "scale_0.75", "scale_1.0"]
    total = trainer.compute_loss(images, labels, out, training=True)
    manual = 0.0
    for key in out:
        s, c = T.segmentation_loss(labels, out[key])
        manual += float(s / c)
    np.testing.assert_allclose(float(total), manual, rtol=1e-5)
    np.testing.assert_allclose(out["fused"].numpy(), np.maximum.reduce([out[k].numpy() for k in out
                                                                         if k != "fused"]), rtol=1e-6)


# ---------------------------------------------------------------------------------------------- precision
@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_trains_and_exports_float32(tmp_path, policy):
    cfg = tiny_config(tmp_path, f"runtime.precision={policy}", "schedule.steps=4", "schedule.steps_per_epoch=2",
                      "schedule.checkpoint_every=2", "optimizer.base_lr=0.01", "optimizer.train_bn=true")
    seen = {}

    class Grab(keras.callbacks.Callback):
        def on_train_end(self, logs=None):
            opt = self.model.optimizer
            inner = getattr(opt, "inner_optimizer", opt)
            seen.update(opt=opt, applied=int(inner.iterations.numpy()),
                        lr=float(keras.ops.convert_to_numpy(opt.learning_rate)))

    result = T.train(cfg, train_data=random_data(), callbacks=[Grab()])
    # poly schedule over the applied steps: lr = base * (1 - k / 4) ** 0.9
    assert seen["applied"] >= 1
    np.testing.assert_allclose(seen["lr"], 0.01 * (1 - seen["applied"] / 4) ** 0.9, rtol=1e-5, atol=1e-9)
    if policy == "mixed_float16":  # dynamic loss scaling (overflowing steps are skipped) around ScaledSGD
        assert isinstance(seen["opt"], keras.optimizers.LossScaleOptimizer)
        assert isinstance(seen["opt"].inner_optimizer, T.ScaledSGD)
    else:
        assert isinstance(seen["opt"], T.ScaledSGD) and seen["applied"] == 4
    net = result.model
    assert net.dtype_policy.name == policy
    assert net(np.zeros((1, 33, 33, 3), "float32")).dtype == "float32"  # final logits in float32
    assert np.isfinite(result.history["loss"]).all()
    assert keras.mixed_precision.global_policy().name == "float32"  # restored
    final = dk.weights.load_model(result.model_path)
    assert final.dtype_policy.name == "float32"
    assert all(w.dtype == "float32" for w in final.weights)
    for a, b in zip(final.weights, net.weights):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    ckpt = dk.weights.load_model(os.path.join(result.run_dir, "checkpoints", "ckpt-4.keras"))
    for a, b in zip(ckpt.weights, net.weights):  # the step-4 checkpoint holds the final weights
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    x = np.random.default_rng(0).uniform(0, 255, (1, 33, 33, 3)).astype("float32")
    np.testing.assert_allclose(final(x).numpy(), net(x).numpy(), atol=0.05 * np.abs(net(x).numpy()).max())
