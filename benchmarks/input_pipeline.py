"""Input pipeline throughput vs the DeepLab train step, side by side in one run.

Writes synthetic VOC-sized JPEG + palette-PNG files (500x375, 21 classes, 255 boundary band) to a temporary
folder, then measures in the same process:

1. images/s of the training pipeline alone (folder_dataset -> make_pipeline: PIL decode, random scale
   0.5..1.5, pad, random crop, flip, batch) for num_parallel_calls 1, 2 and AUTOTUNE;
2. images/s of a DeepLab train step (default: DeepLabV2 ResNet-101 ASPP-L, 321x321, batch 2, plain SGD +
   sparse softmax cross-entropy ignoring 255) on a batch already in memory;
3. images/s of the step fed by the pipeline (the two together).

It prints the ratio pipeline / step; the target is >= 3.

Usage:
    python benchmarks/input_pipeline.py                      # the full setting (GPU)
    python benchmarks/input_pipeline.py --tiny               # a quick CPU smoke run with a tiny model
"""
import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import deeplab_keras as dk  # noqa: E402  (sets KERAS_BACKEND)
import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

from deeplab_keras import data  # noqa: E402
from deeplab_keras.inference import upsample_logits  # noqa: E402


def pipeline(root, args, parallel, seed=0):
    ds = data.folder_dataset(root, num_parallel_calls=parallel, shuffle=True, seed=seed)
    return data.make_pipeline(ds, training=True, batch_size=args.batch_size, crop_size=(args.crop, args.crop),
                              num_classes=21, shuffle_buffer=args.shuffle_buffer, seed=seed,
                              num_parallel_calls=parallel, repeat=True)


def time_pipeline(ds, seconds, warmup=5):
    """Returns (images/s, CPU milliseconds of this process per image)."""
    it = iter(ds)
    for _ in range(warmup):
        next(it)
    count, start, cpu_start = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - start < seconds:
        images, _ = next(it)
        count += int(images.shape[0])
    return count / (time.perf_counter() - start), (time.process_time() - cpu_start) * 1e3 / count


def make_step(args):
    if args.tiny:
        model = dk.DeepLabV2(num_classes=21, backbone="resnet50", width_multiplier=0.125, stage_blocks=(1, 1, 1, 1))
    else:
        model = dk.DeepLabV2(num_classes=21, backbone=args.backbone, output_stride=8, aspp="L")
    optimizer = keras.optimizers.SGD(learning_rate=1e-3, momentum=0.9)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True, ignore_class=255)

    @tf.function
    def step(images, labels):
        labels = tf.cast(labels, tf.int32)
        with tf.GradientTape() as tape:
            logits = model(images, training=True)
            logits = upsample_logits(logits, tf.shape(labels)[1:3])
            loss = loss_fn(labels, logits)
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    return step


def time_step(step, batch, steps, warmup=3):
    images, labels = batch
    for _ in range(warmup):
        step(images, labels).numpy()
    start = time.perf_counter()
    for _ in range(steps):
        loss = step(images, labels)
    loss.numpy()
    return steps * int(images.shape[0]) / (time.perf_counter() - start)


def time_fed(step, ds, steps, warmup=3):
    it = iter(ds)
    for _ in range(warmup):
        step(*next(it)).numpy()
    count, start = 0, time.perf_counter()
    for _ in range(steps):
        images, labels = next(it)
        loss = step(images, labels)
        count += int(images.shape[0])
    loss.numpy()
    return count / (time.perf_counter() - start)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-images", type=int, default=96, help="synthetic VOC-sized files written to disk")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--crop", type=int, default=321)
    parser.add_argument("--shuffle-buffer", type=int, default=64)
    parser.add_argument("--backbone", default="resnet101", choices=["resnet101", "resnet50", "vgg16"])
    parser.add_argument("--pipeline-seconds", type=float, default=6.0, help="timing per parallelism setting")
    parser.add_argument("--steps", type=int, default=30, help="timed train steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed train steps first (tracing)")
    parser.add_argument("--tiny", action="store_true", help="tiny model and fewer steps (CPU smoke run)")
    parser.add_argument("--data-dir", help="reuse/write the synthetic files here instead of a temp folder")
    args = parser.parse_args(argv)
    if args.tiny:
        args.steps = min(args.steps, 5)

    print(f"devices: {[d.name for d in tf.config.list_logical_devices()]}, cpu cores: {os.cpu_count()}")
    tmp = None
    root = args.data_dir
    if root is None:
        tmp = tempfile.TemporaryDirectory(prefix="dk_bench_")
        root = tmp.name
    if not os.path.exists(os.path.join(root, "classes.txt")):
        start = time.perf_counter()
        data.write_synthetic_folder(root, args.num_images, size=(375, 500), num_classes=21, seed=0,
                                    boundary_width=2)
        print(f"wrote {args.num_images} synthetic 500x375 JPEG/PNG pairs in {time.perf_counter() - start:.1f}s")

    results = {}
    for name, parallel in (("1", 1), ("2", 2), ("AUTOTUNE", tf.data.AUTOTUNE)):
        results[name], cpu_ms = time_pipeline(pipeline(root, args, parallel), args.pipeline_seconds)
        print(f"pipeline alone, num_parallel_calls={name:>8}: {results[name]:8.1f} images/s "
              f"({cpu_ms:.1f} CPU-ms per image)")

    step = make_step(args)
    batch = next(iter(pipeline(root, args, tf.data.AUTOTUNE)))
    model_name = "tiny resnet50" if args.tiny else f"DeepLabV2 {args.backbone} ASPP-L"
    step_rate = time_step(step, batch, args.steps, args.warmup)
    print(f"train step alone ({model_name}, {args.crop}x{args.crop}, batch {args.batch_size}): "
          f"{step_rate:8.3g} images/s")
    fed_rate = time_fed(step, pipeline(root, args, tf.data.AUTOTUNE), args.steps, args.warmup)
    print(f"train step fed by the pipeline:                       {fed_rate:8.3g} images/s "
          f"({fed_rate / step_rate:.2f}x the step alone)")
    ratio = results["AUTOTUNE"] / step_rate
    print(f"RATIO pipeline (AUTOTUNE) / train step = {ratio:.3g}  (target >= 3: "
          f"{'met' if ratio >= 3 else 'NOT met'})")
    if tmp is not None:
        tmp.cleanup()
    return ratio


if __name__ == "__main__":
    main()
