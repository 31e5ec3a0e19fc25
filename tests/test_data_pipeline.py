"""make_pipeline: label integrity under augmentation, determinism, evaluation padding, bad-data errors."""
import logging
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

from deeplab_keras import data
from deeplab_keras.data import voc_palette

PALETTE = voc_palette().astype(np.float32)


def _blocks(h, w, seed=0):
    """A label with classes 0 and 20 side by side (bilinear would make 10) and a 255 block; the image is the
    palette colour of each label."""
    rng = np.random.default_rng(seed)
    label = np.zeros((h, w), np.uint8)
    label[:, w // 3: 2 * w // 3] = 20
    label[h // 2:, rng.integers(0, w // 3):] = 255
    label[: h // 4, : w // 4] = 7
    return PALETTE[label].astype(np.uint8), label


def _ds(examples, first=0):
    images, labels = zip(*examples)
    names = [f"ex{i}" for i in range(first, first + len(examples))]
    if len({im.shape for im in images}) == 1:
        return tf.data.Dataset.from_tensor_slices({"image": np.stack(images), "label": np.stack(labels),
                                                   "file_name": names})
    return tf.data.Dataset.from_generator(
        lambda: ({"image": i, "label": lab, "file_name": n} for i, lab, n in zip(images, labels, names)),
        output_signature={"image": tf.TensorSpec([None, None, 3], tf.uint8),
                          "label": tf.TensorSpec([None, None], tf.uint8),
                          "file_name": tf.TensorSpec([], tf.string)})


def _all(ds):
    return [tuple(t.numpy() for t in batch) for batch in ds]


@pytest.mark.parametrize("crop", [(33, 41), (97, 97)])  # smaller than the images / needs padding
def test_training_labels_never_interpolated_and_aligned(crop):
    examples = [_blocks(61, 75, s) for s in range(4)] + [_blocks(47, 83, 9)]
    ds = data.make_pipeline(_ds(examples), training=True, batch_size=2, crop_size=crop, num_classes=21,
                            seed=3, shuffle_buffer=8, drop_remainder=False)
    seen, checked = set(), 0
    for _ in range(3):  # three epochs: different scales / crops / flips
        for images, labels in _all(ds):
            assert images.dtype == np.float32 and labels.dtype == np.uint8
            assert images.shape[1:] == (*crop, 3) and labels.shape[1:] == crop
            values = set(np.unique(labels).tolist())
            assert values <= {0, 7, 20, 255}, values  # nearest: never 10 between 0 and 20
            seen |= values
            # aligned: where the label is constant over a 5x5 window, the image shows that label's colour
            for image, label in zip(images, labels):
                lab = label.astype(np.int32)
                padded = np.pad(lab, 2, mode="edge")
                const = np.ones_like(lab, bool)
                for dy in range(5):
                    for dx in range(5):
                        const &= padded[dy:dy + lab.shape[0], dx:dx + lab.shape[1]] == lab
                inside = const & (lab != 255)
                checked += inside.sum()
                np.testing.assert_allclose(image[inside], PALETTE[lab[inside]], atol=0.5)
    assert {0, 20, 255} <= seen  # 255 survives
    assert checked > 1000


def test_flip_only_keeps_labels_exactly_including_255():
    image, label = _blocks(37, 53)
    ds = data.make_pipeline(_ds([(image, label)] * 16), training=True, batch_size=16, crop_size=(37, 53),
                            scale_range=None, num_classes=21, seed=0)
    images, labels = _all(ds)[0]
    flipped = 0
    for im, lab in zip(images, labels):
        if np.array_equal(lab, label):
            np.testing.assert_array_equal(im, image.astype(np.float32))
        else:
            np.testing.assert_array_equal(lab, label[:, ::-1])
            np.testing.assert_array_equal(im, image[:, ::-1].astype(np.float32))
            flipped += 1
    assert 0 < flipped < 16


def test_label_resize_is_nearest():
    _, label = _blocks(20, 30)
    image = np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8)
    ds = data.make_pipeline(_ds([(image, label)]), training=True, batch_size=1, crop_size=(40, 60),
                            scale_range=(2.0, 2.0), flip=False, seed=0)
    _, labels = _all(ds)[0]
    np.testing.assert_array_equal(labels[0], np.repeat(np.repeat(label, 2, 0), 2, 1))


def test_padding_uses_mean_colour_and_ignore_label():
    image, label = _blocks(21, 17)
    label[:] = 3
    mean = (10.0, 20.0, 30.0)
    ds = data.make_pipeline(_ds([(image, label)]), training=True, batch_size=1, crop_size=(45, 45),
                            scale_range=None, flip=False, mean_rgb=mean, seed=0)
    images, labels = _all(ds)[0]
    pad = labels[0] == 255
    assert pad.sum() == 45 * 45 - 21 * 17
    np.testing.assert_allclose(images[0][pad], np.broadcast_to(mean, (pad.sum(), 3)), atol=1e-4)
    # ignore_label other than 255: padding and the data's 255 both become it
    image, label = _blocks(21, 17)
    ds = data.make_pipeline(_ds([(image, label)]), training=True, batch_size=1, crop_size=(45, 45),
                            scale_range=None, flip=False, ignore_label=254, seed=0)
    _, labels = _all(ds)[0]
    assert 255 not in labels and (labels == 254).sum() == (label == 255).sum() + 45 * 45 - 21 * 17


def test_seeded_pipeline_is_deterministic():
    ds = data.make_synthetic(6, size=(57, 71), num_classes=5, seed=2)

    def run(seed, parallel=None, passes=1):
        p = data.make_pipeline(ds, training=True, batch_size=3, crop_size=(49, 49), seed=seed,
                               num_parallel_calls=parallel)
        return [_all(p) for _ in range(passes)]

    first, second_pass = run(7, passes=2)
    again = run(7, parallel=1)[0]
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(first[0][0], second_pass[0][0])  # a new epoch draws new augmentation
    assert not np.array_equal(first[0][0], run(8)[0][0][0])


def test_eval_full_size_and_padded():
    examples = [_blocks(33, 45, 0), _blocks(41, 29, 1)]
    full = _all(data.make_pipeline(_ds(examples), training=False, batch_size=1, crop_size=None))
    assert len(full) == 2
    for (images, labels), (image, label) in zip(full, examples):
        np.testing.assert_array_equal(images[0], image.astype(np.float32))
        np.testing.assert_array_equal(labels[0], label)
    padded = _all(data.make_pipeline(_ds(examples), training=False, batch_size=2, crop_size=(49, 49),
                                     return_file_name=True))
    images, labels, names = padded[0]
    assert images.shape == (2, 49, 49, 3) and list(names) == [b"ex0", b"ex1"]
    np.testing.assert_array_equal(labels[1][:41, :29], examples[1][1])
    assert (labels[1][41:] == 255).all() and (labels[1][:, 29:] == 255).all()
    with pytest.raises(ValueError, match="batch_size must be 1"):
        data.make_pipeline(_ds(examples), training=False, batch_size=2, crop_size=None)
    with pytest.raises(tf.errors.InvalidArgumentError, match="larger than crop_size.*ex1"):
        _all(data.make_pipeline(_ds(examples), training=False, batch_size=1, crop_size=(35, 47)))


def test_tuple_input_is_accepted():
    image, label = _blocks(25, 25)
    ds = tf.data.Dataset.from_tensors((image, label))
    images, labels = _all(data.make_pipeline(ds, training=False, batch_size=1, crop_size=(25, 25)))[0]
    np.testing.assert_array_equal(labels[0], label)


def _bad_examples():
    good = _blocks(31, 31, 0)
    out_of_range = (good[0], np.where(good[1] == 20, 21, good[1]).astype(np.uint8))
    mismatch = (good[0][:, :30], good[1])
    return [good, out_of_range, good, mismatch, good]


@pytest.mark.parametrize("training", [True, False])
def test_bad_examples_raise_naming_the_file(training):
    examples = _bad_examples()
    kwargs = dict(training=training, batch_size=1, crop_size=(31, 31), num_classes=21, shuffle_buffer=1, seed=0)
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"outside \{0..num_classes-1, 255\}[\s\S]*ex1"):
        _all(data.make_pipeline(_ds(examples[:3]), **kwargs))
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"size mismatch in[\s\S]*ex3"):
        _all(data.make_pipeline(_ds(examples[2:], first=2), **kwargs))


def test_skip_bad_skips_and_counts(caplog):
    examples = _bad_examples()
    with caplog.at_level(logging.WARNING, logger="deeplab_keras.data"):
        out = _all(data.make_pipeline(_ds(examples), training=False, batch_size=1, crop_size=(31, 31),
                                      num_classes=21, skip_bad=True, return_file_name=True))
    assert [o[2][0] for o in out] == [b"ex0", b"ex2", b"ex4"]
    text = caplog.text
    assert "ex1" in text and "ex3" in text and "skipped 2 bad example(s)" in text


def test_works_with_keras_fit():
    import keras
    ds = data.make_synthetic(8, size=(41, 41), num_classes=3, seed=0, boundary_width=1)
    train = data.make_pipeline(ds, training=True, batch_size=4, crop_size=(33, 33), num_classes=3, seed=0)
    inputs = keras.Input((33, 33, 3))
    logits = keras.layers.Conv2D(3, 3, padding="same")(keras.layers.Rescaling(1 / 255.0)(inputs))
    model = keras.Model(inputs, logits)
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True, ignore_class=255))
    history = model.fit(train, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])


@pytest.mark.slow
def test_distributed_pipeline_two_replicas():
    """MirroredStrategy over two logical CPUs (own process: logical devices must be set before TF starts)."""
    code = textwrap.dedent("""
        import tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        from deeplab_keras import data
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
        dist = data.distributed_pipeline(strategy, lambda: data.make_synthetic(8, size=(41, 41), seed=0), 4,
                                         training=True, crop_size=(33, 33), num_classes=4, seed=0)
        images, labels = next(iter(dist))
        shapes = [tuple(t.shape) for t in strategy.experimental_local_results(images)]
        assert shapes == [(2, 33, 33, 3)] * 2, shapes
        total = strategy.reduce("SUM", strategy.run(lambda x: tf.reduce_sum(tf.cast(x < 255, tf.float32)),
                                                    args=(labels,)), axis=None)
        assert 0 < float(total) <= 4 * 33 * 33
        print("OK")
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd()] + sys.path))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]


def _reference(image, label, scaled, top, left, flip, crop, mean, ignore):
    """Whole-image resize (tf.image.resize), pad, crop, flip: what scale_crop_flip must equal."""
    image = tf.image.resize(tf.cast(image, tf.float32), scaled, method="bilinear").numpy()
    label = tf.image.resize(label[..., None], scaled, method="nearest").numpy()[..., 0]
    ph, pw = max(scaled[0], crop[0]), max(scaled[1], crop[1])
    big_image = np.empty((ph, pw, 3), np.float32)
    big_image[:] = mean
    big_image[: scaled[0], : scaled[1]] = image
    big_label = np.full((ph, pw), ignore, np.uint8)
    big_label[: scaled[0], : scaled[1]] = label
    image = big_image[top: top + crop[0], left: left + crop[1]]
    label = big_label[top: top + crop[0], left: left + crop[1]]
    return (image[:, ::-1], label[:, ::-1]) if flip else (image, label)


def test_crop_sampling_equals_resize_pad_crop_flip():
    from deeplab_keras.data.pipeline import scale_crop_flip
    rng = np.random.default_rng(0)
    mean = np.array([1.0, 2.0, 3.0], np.float32)
    for trial in range(40):
        h, w = rng.integers(5, 60, size=2)
        crop = tuple(int(c) for c in rng.integers(3, 50, size=2))
        scaled = [int(max(1, round(h * rng.uniform(0.3, 2.2)))), int(max(1, round(w * rng.uniform(0.3, 2.2))))]
        top = int(rng.integers(0, max(scaled[0], crop[0]) - crop[0] + 1))
        left = int(rng.integers(0, max(scaled[1], crop[1]) - crop[1] + 1))
        flip = bool(rng.integers(0, 2))
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        label = rng.integers(0, 21, (h, w), dtype=np.uint8)
        got_image, got_label = scale_crop_flip(tf.constant(image), tf.constant(label), tf.constant(scaled), top,
                                               left, tf.constant(flip), crop, mean, 255)
        want_image, want_label = _reference(image, label, scaled, top, left, flip, crop, mean, 255)
        np.testing.assert_array_equal(got_label.numpy(), want_label, err_msg=f"trial {trial}")
        np.testing.assert_allclose(got_image.numpy(), want_image, atol=2e-3, err_msg=f"trial {trial}")
