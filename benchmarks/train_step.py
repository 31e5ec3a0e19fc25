"""Train-step throughput of DeepLab v2 (ResNet-101 ASPP-L, 321x321 crops) and its achieved FLOP/s against a
float32 matmul measured in the same process.

The train step is the one ``deeplab_keras.train`` runs (``SegmentationTrainer`` + ``ScaledSGD``, the paper's
recipe: frozen BN, L2 on conv kernels, logits upsampled to the labels). Its FLOPs are counted by the TF
profiler on the traced step graph (forward + backward convolutions, matmuls; element-wise ops are not
counted), so FLOP/s here is the rate of the convolution work. The matmul reference is an n x n float32
matmul (2 n^3 FLOPs) in the same process, i.e. roughly what this CPU's BLAS reaches.

Usage:
    python benchmarks/train_step.py                      # ResNet-101 ASPP-L, batch 1 and 2, CPU
    python benchmarks/train_step.py --batch-sizes 1 --steps 3 --backbone resnet50
    python benchmarks/train_step.py --precisions float32 mixed_float16   # on a GPU: side by side
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import deeplab_keras as dk  # noqa: E402,F401
from deeplab_keras import train as T  # noqa: E402


def matmul_flops_per_s(n=2048, repeats=10):
    """FLOP/s of an n x n float32 matmul (best of ``repeats``)."""
    a = tf.random.normal((n, n), seed=1)
    b = tf.random.normal((n, n), seed=2)
    mm = tf.function(lambda x, y: tf.matmul(x, y))
    mm(a, b).numpy()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        mm(a, b).numpy()
        best = min(best, time.perf_counter() - t)
    return 2.0 * n ** 3 / best


def graph_flops(concrete_fn):
    """Float operations the TF profiler counts in a concrete function's graph (convs, matmuls)."""
    from tensorflow.python.profiler import model_analyzer, option_builder

    options = option_builder.ProfileOptionBuilder.float_operation()
    options["output"] = "none"
    info = model_analyzer.profile(concrete_fn.graph, options=options)
    return float(info.total_float_ops)


def build_step(args, batch, precision):
    cfg = T.TrainConfig(num_classes=21, backbone=args.backbone, output_stride=args.output_stride, aspp="L",
                        crop_size=[args.size, args.size], batch_size=batch, steps=1000, steps_per_epoch=1000,
                        mixed_precision=None if precision == "float32" else precision, tensorboard=False)
    net = T.build_model(cfg)
    import keras
    for layer in net._flatten_layers(include_self=False):
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False
    with T._policy_scope(cfg.mixed_precision):
        trainer = T.SegmentationTrainer(net, 21, weight_decay=cfg.weight_decay)
        opt = T.ScaledSGD(cfg.resolved_base_lr, momentum=0.9,
                          multipliers=[[cfg.classifier_pattern, 10.0], [r"(^|/)bias$", 2.0]])
        if precision == "mixed_float16":
            opt = keras.optimizers.LossScaleOptimizer(opt)
        trainer.compile(optimizer=opt)
    rng = np.random.default_rng(0)
    images = tf.constant(rng.uniform(0, 255, (batch, args.size, args.size, 3)).astype("float32"))
    labels = tf.constant(rng.integers(0, 21, (batch, args.size, args.size)).astype("uint8"))
    trainer(images[:1])
    opt.build(trainer.trainable_variables)
    step = tf.function(trainer.train_step)
    concrete = step.get_concrete_function((images, labels))
    return step, (images, labels), concrete


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbone", default="resnet101", choices=["resnet50", "resnet101", "vgg16"])
    parser.add_argument("--output-stride", type=int, default=8)
    parser.add_argument("--size", type=int, default=321)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--precisions", nargs="+", default=["float32"],
                        choices=["float32", "mixed_float16", "mixed_bfloat16"])
    parser.add_argument("--steps", type=int, default=5, help="timed steps per setting (after 1 warm-up)")
    parser.add_argument("--matmul-n", type=int, default=2048)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)

    device = "GPU" if tf.config.list_physical_devices("GPU") else "CPU"
    print(f"device: {device}; TF intra-op threads {tf.config.threading.get_intra_op_parallelism_threads() or 'auto'}"
          f", {os.cpu_count()} CPUs visible")
    peak = matmul_flops_per_s(args.matmul_n)
    print(f"float32 matmul {args.matmul_n}x{args.matmul_n}: {peak / 1e9:.1f} GFLOP/s")
    rows = []
    for precision in args.precisions:
        for batch in args.batch_sizes:
            step, data, concrete = build_step(args, batch, precision)
            flops = graph_flops(concrete)
            step(data)  # warm-up (and first-call overheads)
            times = []
            for _ in range(args.steps):
                t = time.perf_counter()
                logs = step(data)
                float(logs["loss"])
                times.append(time.perf_counter() - t)
            median = float(np.median(times))
            row = {"backbone": args.backbone, "size": args.size, "batch": batch, "precision": precision,
                   "step_s": round(median, 4), "images_per_s": round(batch / median, 3),
                   "step_gflop": round(flops / 1e9, 1), "achieved_gflop_per_s": round(flops / median / 1e9, 1),
                   "fraction_of_matmul": round(flops / median / peak, 3)}
            rows.append(row)
            print(f"{args.backbone} {args.size}x{args.size} batch {batch} {precision}: {row['step_s']} s/step, "
                  f"{row['images_per_s']} images/s, {row['step_gflop']} GFLOP/step, "
                  f"{row['achieved_gflop_per_s']} GFLOP/s = {row['fraction_of_matmul']:.2f} x matmul")
            # Re-measure the matmul after each setting: the machine is shared and its load changes.
            peak = max(peak, matmul_flops_per_s(args.matmul_n, repeats=3))
    if len(args.precisions) > 1:
        base = {r["batch"]: r for r in rows if r["precision"] == args.precisions[0]}
        for r in rows:
            if r["precision"] != args.precisions[0]:
                print(f"batch {r['batch']}: {r['precision']} / {args.precisions[0]} steps per second = "
                      f"{base[r['batch']]['step_s'] / r['step_s']:.2f}x")
    result = {"device": device, "matmul_gflop_per_s": round(peak / 1e9, 1), "rows": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
