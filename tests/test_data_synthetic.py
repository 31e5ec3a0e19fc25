"""Synthetic data: deterministic, several classes, learnable from colour, sharp (unblended) shapes."""
import numpy as np
import pytest

from deeplab_keras.data import make_synthetic, synthetic


def _arrays(ds):
    return [(ex["image"].numpy(), ex["label"].numpy(), ex["file_name"].numpy()) for ex in ds]


def test_deterministic_per_seed():
    a = _arrays(make_synthetic(4, size=(33, 47), num_classes=5, seed=11))
    b = _arrays(make_synthetic(4, size=(33, 47), num_classes=5, seed=11))
    c = _arrays(make_synthetic(4, size=(33, 47), num_classes=5, seed=12))
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x[0], y[0])
        np.testing.assert_array_equal(x[1], y[1])
    assert not all(np.array_equal(x[1], z[1]) for x, z in zip(a, c))
    assert a[0][0].shape == (33, 47, 3) and a[0][0].dtype == np.uint8 and a[0][1].dtype == np.uint8
    assert len({x[2] for x in a}) == 4


def test_several_classes_learnable_from_colour():
    examples = _arrays(make_synthetic(12, size=(65, 65), num_classes=4, seed=0))
    images = np.concatenate([e[0].reshape(-1, 3) for e in examples]).astype(np.float32)
    labels = np.concatenate([e[1].reshape(-1) for e in examples])
    assert set(np.unique(labels)) == {0, 1, 2, 3}
    assert all(len(np.unique(e[1])) >= 2 for e in examples[:6])
    # nearest class-mean colour already labels most pixels: classes have distinct appearance
    means = np.stack([images[labels == c].mean(0) for c in range(4)])
    predicted = np.argmin(((images[:, None] - means[None]) ** 2).sum(-1), axis=1)
    assert (predicted == labels).mean() > 0.7


def test_edges_are_sharp():
    """The image changes abruptly where the label changes: across label edges colour jumps are much larger than
    between neighbouring pixels of one region (no blending/anti-aliasing)."""
    image, label = synthetic.generate_example(0, (97, 97), 4, seed=5)
    image = image.astype(np.float32)
    diff = np.abs(image[:, 1:] - image[:, :-1]).sum(-1)
    edge = label[:, 1:] != label[:, :-1]
    assert edge.any()
    assert np.median(diff[edge]) > 3 * np.median(diff[~edge])


def test_boundary_band_and_argument_errors():
    _, label = synthetic.generate_example(1, (65, 65), 3, seed=0, boundary_width=2)
    assert 255 in label and set(np.unique(label)) - {255} <= {0, 1, 2}
    with pytest.raises(ValueError, match="num_classes"):
        make_synthetic(2, num_classes=1)


def test_synthetic_images_are_the_generators_scenes():
    """The export verification images (``export.verify.synthetic_images``) are this module's scenes: one generator."""
    from deeplab_keras.export import verify
    images = synthetic.synthetic_images((33, 47), 3, seed=4)
    assert verify.synthetic_images is synthetic.synthetic_images
    assert images.shape == (3, 33, 47, 3) and images.dtype == np.uint8
    for i, image in enumerate(images):
        np.testing.assert_array_equal(image, synthetic.generate_example(i, (33, 47), 4, seed=4)[0])
    assert not np.array_equal(images[0], synthetic.synthetic_images((33, 47), 1, seed=5)[0])
    assert images.std() > 20  # structured content, not a constant
