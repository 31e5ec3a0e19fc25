"""The dense CRF's gradient (DenseCrfGrad) against its forward pass, and a training step with the CRF on top against
the same step without it, side by side in one run.

Headline: a 500x375 VOC image (2007_000063), 21 labels, DeepLab-like probabilities, 10 iterations, DeepLab v2
defaults, with a compatibility matrix (what a trainable CRF runs) and without (Potts). Prints the times (min and
median of interleaved repeats) of: the forward pass, the forward pass keeping its marginals (what training runs),
the backward pass from the saved marginals, and the backward pass that recomputes them; and the ratio
backward / forward (target <= 2). Then one ``train_on_batch`` step of a DeepLab v2 model (``--backbone``, crop
``--crop``, batch ``--batch``) with and without ``model.crf: {trainable: true, iterations: 5}``. Times on a shared
machine are noisy: compare the ratios, measured side by side.

Usage: python benchmarks/crf_gradient.py [--repeats 5] [--threads N] [--skip-step] [--backbone resnet101]
       [--crop 321] [--batch 2] [--step-repeats 3]
"""
import argparse
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from crf_vs_pydensecrf import ITERATIONS, PARAMS, make_inputs  # noqa: E402 (the same headline inputs)


def _timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def crf_times(repeats, classes=21):
    """{name: [seconds]} of the forward and backward variants, interleaved."""
    import tensorflow as tf

    import deeplab_keras as dk

    image, probs = make_inputs(500, 375, classes)
    probs, images = tf.constant(probs[None]), tf.constant(image[None])
    lib = dk.crf.load_library()
    rng = np.random.default_rng(0)
    upstream = tf.constant(rng.normal(size=probs.shape).astype("float32"))
    mu = 1 - np.eye(classes, dtype="float32") + 0.1 * rng.normal(size=(classes, classes)).astype("float32")
    compat = {"potts": tf.zeros([0]), "compatibility": tf.constant(0.5 * (mu + mu.T))}
    values = [PARAMS[k] for k in ("bilateral_weight", "bilateral_xy_std", "bilateral_rgb_std", "gaussian_weight",
                                  "gaussian_xy_std")]
    times = {}
    for _ in range(repeats + 1):  # the first round warms up (lattice caches, thread pool)
        for kind, c in compat.items():
            args = [probs, images, ITERATIONS, *values, c]
            runs = {
                "forward": lambda: lib.dense_crf(*args)[0].numpy(),
                "forward+save": lambda: lib.dense_crf(*args, save_marginals=True)[0].numpy(),
            }
            refined, marginals = lib.dense_crf(*args, save_marginals=True)
            empty = lib.dense_crf(*args)[1]
            runs["backward(saved)"] = lambda: lib.dense_crf_grad(*args, refined, marginals, upstream)[0].numpy()
            runs["backward(recompute)"] = lambda: lib.dense_crf_grad(*args, refined, empty, upstream)[0].numpy()
            for name, fn in runs.items():
                times.setdefault((kind, name), []).append(_timed(fn))
    return {key: values[1:] for key, values in times.items()}


def step_times(backbone, crop, batch, repeats):
    """{"without CRF": [s], "with CRF": [s]}: one ``train_on_batch`` step each, interleaved, with the recipe's loss
    (``segmentation_loss``: logits upsampled to the labels; the CRF model's output already is at their size)."""
    import keras

    import deeplab_keras as dk
    from deeplab_keras.training.losses import segmentation_loss

    def loss(labels, logits):
        total, count = segmentation_loss(labels, logits)
        return total / count

    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (batch, crop, crop, 3)).astype("float32")
    labels = rng.integers(0, 21, (batch, crop, crop))
    models = {}
    for name, crf in (("without CRF", None), ("with CRF", {"trainable": True, "iterations": 5})):
        models[name] = dk.DeepLabV2(num_classes=21, backbone=backbone, crf=crf)
        models[name].compile(optimizer=keras.optimizers.SGD(1e-4), loss=loss)
    times = {}
    for r in range(repeats + 1):  # the first round compiles the train step
        for name, model in models.items():
            seconds = _timed(lambda: model.train_on_batch(images, labels))
            if r:
                times.setdefault(name, []).append(seconds)
    return times


def _line(name, seconds):
    return f"  {name:<34s} min {min(seconds):7.3f} s   median {statistics.median(seconds):7.3f} s"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads (0: TensorFlow's default)")
    parser.add_argument("--skip-step", action="store_true", help="only the CRF forward / backward")
    parser.add_argument("--backbone", default="resnet101")
    parser.add_argument("--crop", type=int, default=321)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--step-repeats", type=int, default=3)
    args = parser.parse_args(argv)
    import tensorflow as tf

    if args.threads:
        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    print(f"CRF 500x375, 21 labels, {ITERATIONS} iterations, DeepLab v2 parameters ({args.repeats} repeats, "
          f"{tf.config.threading.get_intra_op_parallelism_threads() or 'default'} threads)")
    times = crf_times(args.repeats)
    for kind in ("potts", "compatibility"):
        print(f" {kind}:")
        for name in ("forward", "forward+save", "backward(saved)", "backward(recompute)"):
            print(_line(name, times[(kind, name)]))
        forward = statistics.median(times[(kind, "forward")])
        for name in ("backward(saved)", "backward(recompute)"):
            print(f"  {name} / forward = {statistics.median(times[(kind, name)]) / forward:.2f} (median; target "
                  "<= 2 for the saved form)")
        step = statistics.median(times[(kind, "forward+save")]) + statistics.median(times[(kind, "backward(saved)")])
        print(f"  training-time CRF (forward+save + backward) / forward = {step / forward:.2f}")
    if args.skip_step:
        return 0
    print(f"training step: {args.backbone}, crop {args.crop}, batch {args.batch}, train_on_batch "
          f"({args.step_repeats} repeats after one warm-up)")
    steps = step_times(args.backbone, args.crop, args.batch, args.step_repeats)
    for name, seconds in steps.items():
        print(_line(name, seconds))
    ratio = statistics.median(steps["with CRF"]) / statistics.median(steps["without CRF"])
    print(f"  with CRF / without = {ratio:.2f} (median)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
