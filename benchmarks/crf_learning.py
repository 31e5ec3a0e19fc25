"""Evidence that the dense CRF learns: fine-tune its kernel weights and label compatibility from DeepLab v2's
defaults (``DenseCRF(trainable=True)``, CRF-as-RNN style) and compare mIoU against the default CRF, on

* the synthetic set (``deeplab_keras.data.synthetic``) with boundary noise: simulated coarse network outputs
  (``demo.coarse_probabilities``: ground truth averaged over 16x16 cells, noised, upsampled, so the boundaries
  are blurred and wrong), trained on ``--synthetic-train`` images, scored on as many others;
* the packaged VOC 2012 samples (``deeplab_keras.data.sample_data_dir()``, 21 labels): simulated outputs as in
  ``deeplab-demo`` (8x8 cells), trained on the first ``--voc-train`` images, scored on the others (held out) and on all.

Prints mIoU without CRF, with the default CRF and with the learned CRF (same iterations), and the learned values.

Usage: python benchmarks/crf_learning.py [--iterations 5] [--epochs 8] [--lr 0.05]
"""
import argparse
import os
import sys

import numpy as np


def _examples_synthetic(count, offset, size, classes):
    from deeplab_keras.data.synthetic import generate_example

    return [generate_example(offset + i, size=size, num_classes=classes, seed=11) for i in range(count)]


def _examples_voc():
    from deeplab_keras.data import sample_data_dir
    from deeplab_keras.data._common import read_image_rgb, read_index_png

    root = os.path.join(sample_data_dir(), "VOC2012")
    ids = sorted(n[:-4] for n in os.listdir(os.path.join(root, "SegmentationClass")) if n.endswith(".png"))
    return [(read_image_rgb(os.path.join(root, "JPEGImages", i + ".jpg")),
             read_index_png(os.path.join(root, "SegmentationClass", i + ".png"))) for i in ids]


def _with_probs(examples, classes, seed, **coarse):
    from deeplab_keras.apps.demo import coarse_probabilities

    return [(image, label, coarse_probabilities(label, classes, seed=seed + i, **coarse).astype("float32"))
            for i, (image, label) in enumerate(examples)]


def _miou(examples, classes, refine):
    from deeplab_keras.evaluate import confusion_matrix, scores

    cm = 0
    for image, label, probs in examples:
        cm = cm + confusion_matrix(label, np.asarray(refine(probs, image)).argmax(-1), classes)
    return scores(cm)["miou"]


def fine_tune(train, classes, iterations, epochs, lr, compatibility=True):
    """A trained ``DenseCRF(trainable=True)`` (defaults as the start), one image per step."""
    import keras
    import tensorflow as tf

    import deeplab_keras as dk

    layer = dk.crf.DenseCRF(dk.crf.CRFParams(iterations=iterations), trainable=True,
                            learn_compatibility=compatibility)
    layer.build([(None, None, None, classes), (None, None, None, 3)])
    optimizer = keras.optimizers.Adam(lr)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(ignore_class=255)
    for epoch in range(epochs):
        losses = []
        for image, label, probs in train:
            with tf.GradientTape() as tape:
                out = layer([probs[None], image[None]], training=True)
                loss = loss_fn(label[None].astype("int32"), out)
            grads = tape.gradient(loss, layer.trainable_variables)
            optimizer.apply_gradients(zip(grads, layer.trainable_variables))
            losses.append(float(loss))
        print(f"    epoch {epoch + 1}: loss {np.mean(losses):.4f}", flush=True)
    return layer


def study(name, train, test_sets, classes, args):
    import deeplab_keras as dk

    params = dk.crf.CRFParams(iterations=args.iterations)
    print(f"{name}: {classes} labels, fine-tuning on {len(train)} images ({args.epochs} epochs, Adam {args.lr})")
    layer = fine_tune(train, classes, args.iterations, args.epochs, args.lr, not args.weights_only)
    learned, mu = layer.learned_params, layer.learned_compatibility
    if mu is None:
        mu = 1 - np.eye(classes, dtype="float32")
    rows = {"no CRF": lambda p, i: p,
            "default CRF": lambda p, i: dk.crf.dense_crf(p[None], i[None], params)[0],
            "learned CRF": lambda p, i: dk.crf.dense_crf(p[None], i[None], learned, compatibility=mu)[0]}
    print(f"  {'mIoU':<14s}" + "".join(f"{s:>22s}" for s in test_sets))
    for row, refine in rows.items():
        print(f"  {row:<14s}" + "".join(f"{100 * _miou(ex, classes, refine):21.2f}%" for ex in test_sets.values()))
    off = mu - np.diag(np.diag(mu))
    print(f"  learned: bilateral_weight {learned.bilateral_weight:.3f} (from {params.bilateral_weight}), "
          f"gaussian_weight {learned.gaussian_weight:.3f} (from {params.gaussian_weight}); compatibility: diagonal "
          f"mean {np.diag(mu).mean():.3f} (Potts 0), off-diagonal mean {off.sum() / (classes * classes - classes):.3f}"
          f" min {off[~np.eye(classes, dtype=bool)].min():.3f} max {off.max():.3f} (Potts 1)")
    return learned, mu


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--synthetic-train", type=int, default=16)
    parser.add_argument("--synthetic-size", type=int, default=97)
    parser.add_argument("--synthetic-stride", type=int, default=16)
    parser.add_argument("--synthetic-noise", type=float, default=1.5)
    parser.add_argument("--voc-train", type=int, default=4)
    parser.add_argument("--skip-voc", action="store_true")
    parser.add_argument("--skip-synthetic", action="store_true")
    parser.add_argument("--weights-only", action="store_true",
                        help="learn the two kernel weights only (Potts compatibility)")
    args = parser.parse_args(argv)
    classes = 4
    size = (args.synthetic_size, args.synthetic_size)
    # Boundary noise: a coarser grid (stride 16) and noisier logits than the VOC study's simulated outputs.
    coarse = dict(stride=args.synthetic_stride, noise=args.synthetic_noise)
    train = _with_probs(_examples_synthetic(args.synthetic_train, 0, size, classes), classes, 0, **coarse)
    test = _with_probs(_examples_synthetic(args.synthetic_train, 1000, size, classes), classes, 1000, **coarse)
    if not args.skip_synthetic:
        study("synthetic", train, {"train": train, "held out": test}, classes, args)
    if not args.skip_voc:
        voc = _with_probs(_examples_voc(), 21, seed=0)
        study("VOC samples", voc[:args.voc_train],
              {"train": voc[:args.voc_train], "held out": voc[args.voc_train:], "all": voc}, 21, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
