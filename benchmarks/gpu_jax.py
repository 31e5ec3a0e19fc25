"""DeepLab v2's model core under ``KERAS_BACKEND=jax`` (no TensorFlow anywhere): training-step throughput and
inference on a GPU (or any JAX device), in TFLOP/s against the chip's peak and against a matmul measured in the
same run.

A GPU machine often has JAX but no GPU build of TensorFlow: the model core (``deeplab_keras.models``, ``.layers``,
``.backbones``) needs only the keras wheel beside JAX. This script blocks every ``tensorflow`` import with a
meta-path hook before anything else is imported, so a run proves that the path is TensorFlow-free.

Per precision (``float32``, ``mixed_bfloat16``, ``mixed_float16``) and MSC setting it times:

- a training step (``model.train_on_batch``: SGD momentum 0.9, logits upsampled corner-aligned to the labels,
  softmax cross-entropy ignoring 255, frozen batch norm, XLA-compiled by Keras' JAX trainer) at ``--batch`` x
  ``--train-size``; FLOPs = 3x the forward convolutions (``benchmarks/flops.py``);
- inference (``model.predict_on_batch``) at ``--infer-batch`` x ``--infer-size``.

``x peak`` divides the achieved rate by the chip's dense peak for that precision (float32 under JAX's default
matmul precision runs on TF32 tensor cores on Ampere and later, so its peak is the TF32 one; ``--float32-precision
highest`` uses true float32 and its peak); ``x matmul`` divides by an ``--matmul-n`` square matmul in the same
dtype timed in the same run (what the chip's BLAS reaches). The chip is looked up in ``CHIP_PEAKS`` by JAX's
``device_kind``; ``--peak-tflops`` overrides it. ``--profile DIR`` writes a JAX profiler trace of one step of each
setting (open it in TensorBoard / Perfetto to see what limits it: kernel time per op, gaps, memory copies).

Usage:
    python benchmarks/gpu_jax.py                              # ResNet-101 ASPP-L: batch 10 at 321, infer 513
    python benchmarks/gpu_jax.py --precisions mixed_bfloat16 --msc both --json gpu.json
    python benchmarks/gpu_jax.py --tiny                       # seconds on a CPU (what the test runs)
"""
import argparse
import importlib.abc
import os
import sys
import time


class _NoTensorFlow(importlib.abc.MetaPathFinder):
    """Refuses ``import tensorflow`` (and its submodules); remembers who tried."""

    attempts = []

    def find_spec(self, name, path=None, target=None):
        if name == "tensorflow" or name.startswith("tensorflow."):
            self.attempts.append(name)
            raise ImportError(f"{name} is blocked: the JAX benchmark must not import TensorFlow")
        return None


if os.environ.get("KERAS_BACKEND", "jax") != "jax":
    sys.exit(f"gpu_jax.py runs the JAX backend; unset KERAS_BACKEND (it is {os.environ['KERAS_BACKEND']!r})")
os.environ["KERAS_BACKEND"] = "jax"
sys.meta_path.insert(0, _NoTensorFlow())
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")
MSC_SCALES = (1.0, 0.75, 0.5)
TINY = dict(backbone="resnet50", width_multiplier=0.125, stage_blocks=(1, 1, 1, 1))
# Dense (no sparsity) peak TFLOP/s from the vendors' datasheets: float32 (CUDA cores), tf32, bfloat16, float16
# tensor cores. Matched against JAX's device_kind in this order (the first key found in it wins).
CHIP_PEAKS = {
    "H100 PCIe": {"float32": 51.2, "tf32": 378.0, "bfloat16": 756.0, "float16": 756.0},
    "H200": {"float32": 66.9, "tf32": 494.7, "bfloat16": 989.4, "float16": 989.4},
    "H100": {"float32": 66.9, "tf32": 494.7, "bfloat16": 989.4, "float16": 989.4},
    "A100": {"float32": 19.5, "tf32": 156.0, "bfloat16": 312.0, "float16": 312.0},
    "L40S": {"float32": 91.6, "tf32": 183.0, "bfloat16": 362.0, "float16": 362.0},
    "L40": {"float32": 90.5, "tf32": 90.5, "bfloat16": 181.0, "float16": 181.0},
    "L4": {"float32": 30.3, "tf32": 60.0, "bfloat16": 121.0, "float16": 121.0},
    "A10": {"float32": 31.2, "tf32": 62.5, "bfloat16": 125.0, "float16": 125.0},
    "V100": {"float32": 15.7, "tf32": None, "bfloat16": None, "float16": 125.0},
    "T4": {"float32": 8.1, "tf32": None, "bfloat16": None, "float16": 65.0},
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny model and sizes, MSC off and on: a CPU smoke run")
    p.add_argument("--backbone", default="resnet101", choices=["resnet50", "resnet101", "vgg16"])
    p.add_argument("--batch", type=int, default=None, help="training batch (default 10; tiny 2)")
    p.add_argument("--train-size", type=int, default=None, help="training crop side (default 321; tiny 65)")
    p.add_argument("--infer-size", type=int, default=None, help="inference side (default 513; tiny 65)")
    p.add_argument("--infer-batch", type=int, default=1)
    p.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=PRECISIONS)
    p.add_argument("--msc", choices=["off", "on", "both"], default=None, help="default off (tiny: both)")
    p.add_argument("--steps", type=int, default=None, help="timed steps / calls per setting (default 10; tiny 1)")
    p.add_argument("--float32-precision", choices=["default", "highest"], default="default",
                   help="JAX matmul/conv precision of float32 (default: TF32 tensor cores where the chip has them)")
    p.add_argument("--peak-tflops", type=float, default=None, help="the chip's peak for every precision (overrides "
                                                                   "the CHIP_PEAKS lookup)")
    p.add_argument("--matmul-n", type=int, default=None, help="reference matmul side (default 8192; tiny 256)")
    p.add_argument("--profile", help="write a JAX profiler trace of one step per setting into this folder")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    tiny = args.tiny
    args.batch = args.batch or (2 if tiny else 10)
    args.train_size = args.train_size or (65 if tiny else 321)
    args.infer_size = args.infer_size or (65 if tiny else 513)
    args.msc = args.msc or ("both" if tiny else "off")
    args.steps = args.steps or (1 if tiny else 10)
    args.matmul_n = args.matmul_n or (256 if tiny else 8192)
    return args


def chip_peak(device_kind, precision, float32_precision, override=None):
    """Peak TFLOP/s of the chip for ``precision`` (None when unknown, e.g. on a CPU)."""
    if override:
        return override
    for name, peaks in CHIP_PEAKS.items():
        if name.lower() in device_kind.lower():
            if precision == "float32":
                return peaks["tf32"] if float32_precision == "default" and peaks["tf32"] else peaks["float32"]
            return peaks["bfloat16" if precision == "mixed_bfloat16" else "float16"]
    return None


def matmul_tflops(n, dtype, repeats=5):
    """Best-of-``repeats`` TFLOP/s of an ``n x n`` matmul in ``dtype`` on the default JAX device."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), dtype)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), dtype)
    mm = jax.jit(jnp.matmul)
    mm(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        mm(a, b).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2.0 * n ** 3 / best / 1e12


def peak_memory_mb():
    """Peak device memory in use (MB) where the device reports it, else the process's peak RSS."""
    import resource

    import jax

    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return stats["peak_bytes_in_use"] / 1e6, "device"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3, "process RSS"


def build(model_kwargs, precision, msc, num_classes=21):
    """A compiled DeepLabV2 under ``precision``: frozen BN, SGD, the upsampled-logits cross-entropy."""
    import keras

    import deeplab_keras as dk
    from deeplab_keras._keras_compat import flatten_layers
    from deeplab_keras.layers.preprocessing import resize_aligned

    keras.config.set_dtype_policy(precision)
    keras.utils.set_random_seed(0)
    model = dk.DeepLabV2(num_classes=num_classes, msc_scales=MSC_SCALES if msc else None, **model_kwargs)
    for layer in flatten_layers(model):
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False
    cross_entropy = keras.losses.SparseCategoricalCrossentropy(from_logits=True, ignore_class=255)

    def loss(labels, logits):
        shape = keras.ops.shape(labels)
        return cross_entropy(labels, resize_aligned(keras.ops.cast(logits, "float32"), (shape[1], shape[2])))

    model.compile(optimizer=keras.optimizers.SGD(2.5e-4, momentum=0.9), loss=loss)  # mixed_float16: loss scaling
    return model


def timed(call, steps):
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return times


def run_setting(args, model_kwargs, precision, msc, peak, matmul, device_kind):
    import jax
    import numpy as np

    from flops import TRAIN_STEP_FACTOR, forward_flops

    model = build(model_kwargs, precision, msc)
    rng = np.random.default_rng(0)
    size, batch = args.train_size, args.batch
    images = rng.uniform(0, 255, (batch, size, size, 3)).astype("float32")
    labels = rng.integers(0, 21, (batch, size, size)).astype("int32")
    start = time.perf_counter()
    first_loss = float(model.train_on_batch(images, labels))
    compile_s = time.perf_counter() - start
    step = lambda: model.train_on_batch(images, labels)  # noqa: E731  (returns the loss: synchronised)
    if args.profile:
        with jax.profiler.trace(os.path.join(args.profile, f"train_{precision}_msc_{'on' if msc else 'off'}")):
            step()
    train_times = timed(step, args.steps)
    last_loss = float(step())
    infer = rng.uniform(0, 255, (args.infer_batch, args.infer_size, args.infer_size, 3)).astype("float32")
    logits = model.predict_on_batch(infer)
    infer_times = timed(lambda: model.predict_on_batch(infer), args.steps)
    rows = []
    for kind, times, flops, images_per_call in (
            ("train", train_times, TRAIN_STEP_FACTOR * batch * forward_flops(model, size, size), batch),
            ("infer", infer_times, args.infer_batch * forward_flops(model, args.infer_size, args.infer_size),
             args.infer_batch)):
        median = float(np.median(times))
        tflops = flops / median / 1e12
        rows.append({"kind": kind, "precision": precision, "msc": msc, "median_s": median, "min_s": min(times),
                     "images_per_s": images_per_call / median, "tflop": flops / 1e12, "tflop_per_s": tflops,
                     "x_peak": tflops / peak if peak else None, "x_matmul": tflops / matmul})
    memory, memory_kind = peak_memory_mb()
    for row in rows:
        row.update(peak_memory_mb=memory, memory_kind=memory_kind, compile_s=compile_s, device=device_kind,
                   loss_first=first_loss, loss_last=last_loss, logits_shape=list(logits.shape),
                   logits_finite=bool(np.isfinite(logits).all()))
    return rows


def main(argv=None):
    args = parse_args(argv)
    import jax
    import jax.numpy as jnp
    import keras

    from deeplab_keras.files import atomic_write_json

    if args.float32_precision == "highest":
        jax.config.update("jax_default_matmul_precision", "highest")
    device = jax.devices()[0]
    device_kind = f"{device.platform}: {device.device_kind}"
    model_kwargs = dict(TINY) if args.tiny else dict(backbone=args.backbone,
                                                     aspp="largefov" if args.backbone == "vgg16" else "L")
    print(f"# JAX {jax.__version__} on {device_kind} ({jax.device_count()} devices, first used), Keras "
          f"{keras.__version__}; model {model_kwargs}; load average {os.getloadavg()[0]:.2f}", flush=True)
    dtypes = {"float32": jnp.float32, "mixed_bfloat16": jnp.bfloat16, "mixed_float16": jnp.float16}
    rows = []
    for precision in args.precisions:
        peak = chip_peak(device.device_kind, precision, args.float32_precision, args.peak_tflops)
        matmul = matmul_tflops(args.matmul_n, dtypes[precision])
        print(f"{precision}: chip peak {peak or 'unknown'} TFLOP/s, {args.matmul_n}^2 matmul {matmul:.3f} TFLOP/s",
              flush=True)
        for msc in {"off": [False], "on": [True], "both": [False, True]}[args.msc]:
            rows += run_setting(args, model_kwargs, precision, msc, peak, matmul, device_kind)
    keras.config.set_dtype_policy("float32")
    print(f"\n{'kind':<6}{'precision':<16}{'MSC':<5}{'median s':>10}{'img/s':>9}{'TFLOP':>9}{'TFLOP/s':>9}"
          f"{'x peak':>8}{'x matmul':>10}{'peak MB':>10}")
    for r in rows:
        x_peak = f"{r['x_peak']:.3f}" if r["x_peak"] is not None else "n/a"
        print(f"{r['kind']:<6}{r['precision']:<16}{'on' if r['msc'] else 'off':<5}{r['median_s']:>10.4f}"
              f"{r['images_per_s']:>9.2f}{r['tflop']:>9.3f}{r['tflop_per_s']:>9.3f}{x_peak:>8}"
              f"{r['x_matmul']:>10.3f}{r['peak_memory_mb']:>10.0f}")
    tf_loaded = sorted(m for m in sys.modules if m == "tensorflow" or m.startswith("tensorflow."))
    print(f"# training: batch {args.batch} x {args.train_size}^2, inference: batch {args.infer_batch} x "
          f"{args.infer_size}^2, median of {args.steps}; peak memory is {rows[-1]['memory_kind']}; TensorFlow "
          f"modules loaded: {len(tf_loaded)}, blocked import attempts: {len(_NoTensorFlow.attempts)}", flush=True)
    result = {"args": vars(args), "device": device_kind, "rows": rows, "tensorflow_modules": tf_loaded,
              "tensorflow_import_attempts": sorted(set(_NoTensorFlow.attempts))}
    if args.json:
        atomic_write_json(args.json, result, indent=1)
    return result


if __name__ == "__main__":
    main()
