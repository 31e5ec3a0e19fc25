"""The CRF raises the mIoU of a coarse model's predictions, measured by evaluate() with the CRF on and off in
one run. The coarse model: per-pixel class scores from the class mean colours (a 1x1 conv fitted on the
synthetic training split), averaged over 9x9 windows with stride 8 -- logits at output stride 8, like DeepLab."""
import keras
import numpy as np

from deeplab_keras.data import make_synthetic
from deeplab_keras.evaluate import evaluate, format_table

C = 4


def coarse_colour_model(train, temperature=1000.0):
    sums, counts = np.zeros((C, 3)), np.zeros(C)
    for ex in train:
        image = ex["image"].numpy().reshape(-1, 3).astype(float)
        label = ex["label"].numpy().ravel()
        for c in range(C):
            sums[c] += image[label == c].sum(0)
            counts[c] += (label == c).sum()
    mu = sums / counts[:, None]
    images = keras.Input((None, None, 3))
    conv = keras.layers.Conv2D(C, 1, name="colour_scores")
    logits = keras.layers.AveragePooling2D(9, strides=8, padding="same")(conv(images))
    model = keras.Model(images, logits)
    # -|x - mu_c|^2 / T up to a per-pixel constant: (2 mu_c . x - |mu_c|^2) / T
    conv.set_weights([(2 * mu.T / temperature)[None, None].astype("float32"),
                      (-(mu ** 2).sum(1) / temperature).astype("float32")])
    return model


def test_crf_raises_miou_of_coarse_predictions():
    model = coarse_colour_model(make_synthetic(24, size=(97, 97), num_classes=C, seed=0))
    val = make_synthetic(12, size=(97, 97), num_classes=C, seed=1000003)
    assert model(np.zeros((1, 97, 97, 3), "float32")).shape == (1, 13, 13, C)  # output stride 8
    results = evaluate(model, val, C, crf=True, progress=False)
    print(format_table(results))
    before, after = results["no_crf"]["miou"], results["crf"]["miou"]
    assert 0.7 < before < 0.97  # coarse but sensible
    assert after > before + 0.01, (before, after)
    assert results["crf"]["pixel_accuracy"] > results["no_crf"]["pixel_accuracy"]
