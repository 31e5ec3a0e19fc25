"""The whole DeepLab v2 network on this machine, every path side by side in one run: time, GFLOP/s, the ratio to
the machine's float32 matmul rate, and peak memory.

Inference paths (batch 1, ``--size``, the exported computation ``export.serving.serving_outputs``: logits ->
corner-aligned resize -> softmax + argmax):

- ``tf``: what ``deeplab eval`` / ``deeplab predict`` run: ``deeplab_keras.inference.Predictor`` (its
  ``tf.function``, the rewritten graph of ``deeplab_keras.graph_rewrite``: native dilated convolutions, batch norm
  folded from the current weights in every call, fused ResNet ASPP head), labels the argmax of its probabilities;
- ``tf_plain``: the same with ``graph="plain"`` (Keras' own graph of the model: SpaceToBatchND + Conv2D +
  BatchToSpaceND per dilated convolution, batch norm not folded);
- ``tf_xla``: the exported computation on Keras' own graph in a ``tf.function`` with ``jit_compile=True`` (XLA);
- ``saved_model``: the SavedModel ``deeplab-export`` writes, through ``tf.saved_model.load`` (uint8 input);
- ``litert``: the float32 ``.tflite`` (static input size) in the LiteRT interpreter (XNNPACK);
- ``onnxruntime``: the ``.onnx`` (static input size) in onnxruntime (``export.onnx.make_session``);
- ``tf_bf16`` / ``tf_bf16_plain``: ``tf`` / ``tf_plain`` with ``precision="bf16"`` (the bfloat16 copy of the model,
  ``deeplab_keras.precision``, ``--precision bf16``: oneDNN with the CPU's ``avx512_bf16`` / AMX; left out with a
  note on a CPU without them);
- ``torch`` / ``torch_bf16``: the PyTorch peer (``benchmarks/torch_deeplab.py``: the same network, the Keras
  model's weights copied in, the same outputs), float32 and under CPU bfloat16 autocast. Every path's ``x_torch``
  is its time over ``torch``'s (float32) in the same round (median over rounds). Without torch
  (``pip install -r benchmarks/requirements.txt``) the torch paths are left out with a note.

Training paths (``--train-size``, each of ``--train-batches``): one step of the package's trainer
(``train.SegmentationTrainer`` + ``ScaledSGD``: the recipe's loss at full resolution, L2, frozen batch norm),
MSC (1, 0.75, 0.5) off and on, with ``jit_compile`` off and on; ``train_bf16`` the same step under the
``mixed_bfloat16`` policy (``runtime.precision: mixed_bfloat16``) and ``torch_train`` the PyTorch peer's step (the
same loss, L2, classifier multiplier and frozen batch norm: ``torch_deeplab.train_step_fn``), both MSC off only.
Each setting runs in its own process (its peak RSS is its own; one that runs out of memory is reported as failed
and the others go on). ``x_torch``: the row's median time over the ``torch_train`` row's of the same batch.

FLOPs are counted analytically (``benchmarks/flops.py``: convolutions, 2 per multiply-add; a training step is 3x
the forward pass). Inference paths are timed in interleaved rounds, each round also timing an n x n float32
matmul in numpy and in TF, so that a load change on a shared machine hits all of them alike. Columns:
``x matmul`` the path's FLOP rate over the best matmul rate of the same round (median over rounds); ``cpu s`` the
process's CPU time per call (all threads: on a loaded machine the wall time waits for cores, the CPU time less
so, though spinning worker threads count in it); ``peak RSS`` the process's resident memory at its highest during
the path's calls and ``+MB`` that peak minus the resident memory just before the call (the path's working
memory). Notes: ``load_mb`` the resident memory the path added when it was loaded and first run (the exports
are written by a child process, so their conversions do not count), ``x_tf`` the median over rounds of the
path's time over ``tf``'s in the same round, ``x_tf_min`` the ratio of the best times, ``size_vs_weights`` the
SavedModel's size over the model's weight bytes.

Usage:
    python benchmarks/network.py                          # ResNet-101 ASPP-L, 513x513, training at 321x321
    python benchmarks/network.py --paths tf onnxruntime --repeats 5
    python benchmarks/network.py --tiny --json out.json   # seconds: a tiny model (what the test runs)
"""
import argparse
import json
import os
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

INFERENCE_PATHS = ("tf", "tf_plain", "tf_xla", "tf_bf16", "tf_bf16_plain", "saved_model", "litert", "onnxruntime",
                   "torch", "torch_bf16")
TRAIN_PATHS = ("train", "train_xla", "train_bf16", "torch_train")
TORCH_PATHS = ("torch", "torch_bf16", "torch_train")
BF16_PATHS = ("tf_bf16", "tf_bf16_plain", "train_bf16")
MSC_OFF_ONLY = ("train_bf16", "torch_train")
MSC_SCALES = (1.0, 0.75, 0.5)
TINY = dict(backbone="resnet50", width_multiplier=0.125, stage_blocks=(1, 1, 1, 1))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny model, 65x65 inputs, 1 round: a smoke run")
    p.add_argument("--backbone", default="resnet101", choices=["resnet50", "resnet101", "vgg16"])
    p.add_argument("--aspp", default=None, help="ASPP rates: L (default for ResNet), S, largefov")
    p.add_argument("--size", type=int, default=None, help="inference input side (default 513; tiny 65)")
    p.add_argument("--train-size", type=int, default=None, help="training crop side (default 321; tiny 65)")
    p.add_argument("--train-batches", type=int, nargs="+", default=None, help="default 2 10 (tiny 2)")
    p.add_argument("--paths", nargs="+", default=list(INFERENCE_PATHS + TRAIN_PATHS),
                   choices=INFERENCE_PATHS + TRAIN_PATHS)
    p.add_argument("--msc", choices=["off", "on", "both"], default="both", help="MSC settings of the train step")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds/steps per path (default 3; tiny 1)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="intra-op threads of every runtime")
    p.add_argument("--matmul-n", type=int, default=None, help="matmul side (default 2048; tiny 256)")
    p.add_argument("--workdir", help="where the exports are written (default a temporary directory)")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    tiny = args.tiny
    args.size = args.size or (65 if tiny else 513)
    args.train_size = args.train_size or (65 if tiny else 321)
    args.train_batches = args.train_batches or ([2] if tiny else [2, 10])
    args.repeats = args.repeats or (1 if tiny else 3)
    args.matmul_n = args.matmul_n or (256 if tiny else 2048)
    return args


class PeakRSS:
    """Samples the process's resident memory every ``interval`` s while active (``with sampler: ...``)."""

    def __init__(self, interval=0.005):
        import psutil

        self._process, self.interval = psutil.Process(), interval
        self.peak = self.before = 0

    def rss(self):
        return self._process.memory_info().rss

    def __enter__(self):
        self.before = self.peak = self.rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self.rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())
        return False


def matmul_rates(n, tf):
    """Best-of-3 FLOP/s of an ``n x n`` float32 matmul: ``{"numpy": ..., "tf": ...}``."""
    import numpy as np

    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((n, n), np.float32), rng.standard_normal((n, n), np.float32)
    ta, tb = tf.constant(a), tf.constant(b)
    tf_mm = tf.function(tf.matmul)
    calls = {"numpy": lambda: a @ b, "tf": lambda: tf_mm(ta, tb).numpy()}
    rates = {}
    for name, call in calls.items():
        call()
        best = min(_seconds(call) for _ in range(3))
        rates[name] = 2.0 * n ** 3 / best
    return rates


def _seconds(call):
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def _wall_and_cpu(call):
    cpu = time.process_time()
    wall = _seconds(call)
    return wall, time.process_time() - cpu


def export_artifacts(model_kwargs, weights, args, workdir):
    """Writes the SavedModel, ``.tflite`` and ``.onnx`` of the model (``weights``) and their reports' sizes to
    ``workdir/sizes.json``. Run in a child process, so that the conversions' memory stays out of the
    measurements."""
    import deeplab_keras as dk
    from deeplab_keras.export import onnx as onnx_export, saved_model, tflite
    from deeplab_keras.files import atomic_write_json

    model = dk.DeepLabV2(**model_kwargs)
    model.load_weights(weights)
    size, sizes = (args.size, args.size), {}
    if "saved_model" in args.paths:
        sizes["saved_model"] = saved_model.export_saved_model(
            model, os.path.join(workdir, "sm"), version=1, overwrite=True, num_samples=1, verify_size=(65, 65))
    if "litert" in args.paths:
        sizes["litert"] = tflite.export_tflite(model, os.path.join(workdir, "model.tflite"), input_size=size,
                                               overwrite=True, num_samples=1, num_threads=args.threads)
    if "onnxruntime" in args.paths:
        sizes["onnxruntime"] = onnx_export.export_onnx(model, os.path.join(workdir, "model.onnx"), input_size=size,
                                                       overwrite=True, num_samples=1)
    atomic_write_json(os.path.join(workdir, "sizes.json"), {k: r["size_bytes"] for k, r in sizes.items()})


def inference_runners(model, model_kwargs, args, workdir, tf):
    """``{path: (run(images uint8 [1,H,W,3]) -> labels, notes)}`` for the requested inference paths; each
    runner has run once (tracing, allocations) and its notes hold ``load_mb``: the resident memory it added."""
    import multiprocessing

    import numpy as np

    from deeplab_keras.export import onnx as onnx_export, saved_model, tflite

    weights = os.path.join(workdir, "model.weights.h5")
    model.save_weights(weights)
    child = multiprocessing.get_context("spawn").Process(target=export_artifacts,
                                                         args=(model_kwargs, weights, args, workdir))
    child.start()
    child.join()
    if child.exitcode:
        raise RuntimeError(f"exporting the model failed (exit code {child.exitcode}); see the lines above")
    with open(os.path.join(workdir, "sizes.json")) as f:
        sizes = json.load(f)
    weight_bytes = sum(np.asarray(w).nbytes for w in model.weights)
    makers = {"tf_xla": lambda: _tf_runner(model, tf, jit=True)}
    for path, precision, graph in (("tf", None, "rewritten"), ("tf_plain", None, "plain"),
                                   ("tf_bf16", "bf16", "rewritten"), ("tf_bf16_plain", "bf16", "plain")):
        makers[path] = lambda precision=precision, graph=graph: _predictor_runner(model, tf, precision, graph)
    makers["saved_model"] = lambda: (lambda x, f=tf.saved_model.load(os.path.join(workdir, "sm", "1")).signatures[
        saved_model.SIGNATURE_IMAGE]: f(image=tf.constant(x))["labels"].numpy())
    makers["litert"] = lambda: (lambda x, r=tflite.TFLiteRunner(os.path.join(workdir, "model.tflite"),
                                                                 num_threads=args.threads):
                                r(x.astype(np.float32))["labels"])
    makers["onnxruntime"] = lambda: (lambda x, s=onnx_export.make_session(os.path.join(workdir, "model.onnx"),
                                                                          num_threads=args.threads):
                                     onnx_export.run_onnx(s, x)["labels"])
    for path in ("torch", "torch_bf16"):
        makers[path] = lambda path=path: _torch_runner(model, model_kwargs, args, path == "torch_bf16")
    probe = np.zeros((1, args.size, args.size, 3), np.uint8)
    runners, sampler = {}, PeakRSS()
    for path in [p for p in INFERENCE_PATHS if p in args.paths]:
        with sampler:
            run = makers[path]()
            run(probe)
        notes = {"load_mb": round((sampler.rss() - sampler.before) / 1e6)}
        if path in sizes:
            notes["size_mb"] = round(sizes[path] / 1e6, 1)
        if path == "saved_model":
            notes["size_vs_weights"] = round(sizes[path] / weight_bytes, 3)
        runners[path] = (run, notes)
    return runners


def _predictor_runner(model, tf, precision, graph):
    """``run(uint8 images) -> labels`` through ``deeplab_keras.inference.Predictor`` (its traced function)."""
    from deeplab_keras.inference import Predictor

    predictor = Predictor(model, precision=precision, graph=graph)
    return lambda x: tf.argmax(predictor(tf.constant(x, tf.float32)), axis=-1, output_type=tf.int32).numpy()


def _tf_runner(model, tf, jit=False):
    """``run(uint8 images) -> labels`` through the exported computation in one traced ``tf.function``."""
    from deeplab_keras.export import serving

    fn = tf.function(lambda x: serving.serving_outputs(model, x), jit_compile=jit, autograph=False)
    return lambda x: fn(tf.constant(x, tf.float32))["labels"].numpy()


def torch_peer(model_kwargs, keras_model=None):
    """The PyTorch DeepLab v2 of ``model_kwargs`` (``torch_deeplab.DeepLabV2Torch``), with ``keras_model``'s weights
    copied in by layer name when given (else torch's own initialisation)."""
    import torch

    from deeplab_keras._keras_compat import flatten_layers
    from torch_deeplab import DeepLabV2Torch, load_keras_weights

    torch.manual_seed(0)
    net = DeepLabV2Torch(model_kwargs["num_classes"], model_kwargs["backbone"], model_kwargs.get("aspp", "L"),
                         model_kwargs.get("width_multiplier", 1.0), model_kwargs.get("stage_blocks"))
    if keras_model is not None:
        layers = {layer.name: layer for layer in flatten_layers(keras_model)}
        load_keras_weights(net, lambda name: layers[name].get_weights())
    return net


def _torch_runner(model, model_kwargs, args, bf16):
    import torch

    from torch_deeplab import inference_fn

    torch.set_num_threads(args.threads)
    return inference_fn(torch_peer(model_kwargs, model), torch.bfloat16 if bf16 else torch.float32)


def available_paths(paths, model_kwargs):
    """``(paths, notes)``: ``paths`` less those this machine cannot run (torch not installed, a VGG model for the
    torch peer, bfloat16 on a CPU without it), with one note per left-out group."""
    from deeplab_keras.precision import bf16_supported

    notes, drop = [], set()
    try:
        import torch  # noqa: F401
    except ImportError:
        drop.update(TORCH_PATHS)
        notes.append("torch is not installed (pip install -r benchmarks/requirements.txt): no torch paths")
    if model_kwargs["backbone"] == "vgg16":
        drop.update(TORCH_PATHS)
        notes.append("the torch peer is a ResNet DeepLab: no torch paths for vgg16")
    if not bf16_supported():
        drop.update(BF16_PATHS)
        notes.append("this CPU has no avx512_bf16 / AMX: no bfloat16 paths")
    return [p for p in paths if p not in drop], notes


def time_inference(runners, images, flops, args, tf):
    """Interleaved rounds; per path: seconds, FLOP rates, ratios to the same round's matmul, peak memory."""
    import numpy as np

    rows = {name: {"times": [], "cpu": [], "ratios": [], "peak_rss": 0, "extra": 0} for name in runners}
    reference = None
    for name, (run, _) in runners.items():  # agreement with the first path
        labels = run(images[:1])
        reference = labels if reference is None else reference
        rows[name]["labels_vs_first"] = float(np.mean(labels == reference))
    sampler, matmuls = PeakRSS(), []
    for r in range(args.repeats):
        rates = matmul_rates(args.matmul_n, tf)
        matmuls.append(rates)
        x = images[(r + 1) % len(images)][None]
        for name, (run, _) in runners.items():
            with sampler:
                seconds, cpu = _wall_and_cpu(lambda: run(x))
            row = rows[name]
            row["times"].append(seconds)
            row["cpu"].append(cpu)
            row["ratios"].append(flops / seconds / max(rates.values()))
            row["peak_rss"] = max(row["peak_rss"], sampler.peak)
            row["extra"] = max(row["extra"], sampler.peak - sampler.before)
    return rows, matmuls


def train_setting(model_kwargs, args, path, msc, batch, out):
    """Times one training setting of ``path`` (``train``, ``train_xla``, ``train_bf16`` or ``torch_train``; run in a
    child process: its peak RSS is the setting's own, and running out of memory ends only this setting); writes
    the row as JSON to ``out``."""
    import resource

    import keras
    import numpy as np
    import tensorflow as tf

    import deeplab_keras as dk
    from deeplab_keras.files import atomic_write_json
    from flops import TRAIN_STEP_FACTOR, forward_flops

    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    size, rng = args.train_size, np.random.default_rng(0)
    keras.utils.set_random_seed(0)
    if path == "train_bf16":
        keras.mixed_precision.set_global_policy("mixed_bfloat16")
    net = dk.DeepLabV2(msc_scales=MSC_SCALES if msc else None, **model_kwargs)
    images = rng.uniform(0, 255, (batch, size, size, 3)).astype(np.float32)
    labels = rng.integers(0, net.num_classes, (batch, size, size)).astype(np.uint8)
    step = _torch_step(model_kwargs, args) if path == "torch_train" else _keras_step(net, msc, path == "train_xla")
    step(images, labels)  # trace / compile
    times, cpus, rates = [], [], []
    for _ in range(args.repeats):
        rates.append(max(matmul_rates(args.matmul_n, tf).values()))
        wall, cpu = _wall_and_cpu(lambda: step(images, labels))
        times.append(wall)
        cpus.append(cpu)
    flops = TRAIN_STEP_FACTOR * batch * forward_flops(net, size, size)
    median = float(np.median(times))
    atomic_write_json(out, {
        "median_s": median, "min_s": min(times), "cpu_s": float(np.median(cpus)), "gflop": flops / 1e9,
        "gflop_per_s": flops / median / 1e9,
        "x_matmul": float(np.median([flops / t / m for t, m in zip(times, rates)])),
        "images_per_s": batch / median, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3,
        "extra_mb": float("nan")})


def _keras_step(net, msc, jit):
    """The package's training step: ``SegmentationTrainer`` + ``ScaledSGD``, frozen batch norm (the recipe)."""
    import keras

    from deeplab_keras import train as T
    from deeplab_keras._keras_compat import flatten_layers

    for layer in flatten_layers(net):
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False
    trainer = T.SegmentationTrainer(net, net.num_classes, msc=msc, weight_decay=5e-4)
    trainer.compile(optimizer=T.ScaledSGD(2.5e-4, momentum=0.9, multipliers=[["aspp", 10.0]]), jit_compile=jit)
    return trainer.train_on_batch


def _torch_step(model_kwargs, args):
    import torch

    from torch_deeplab import train_step_fn

    torch.set_num_threads(args.threads)
    return train_step_fn(torch_peer(model_kwargs))


def train_rows(model_kwargs, args, workdir):
    """One row per (path, MSC, batch): a training step, frozen BN, each in its own process (``train_bf16`` and
    ``torch_train`` with MSC off only); a setting that fails (e.g. killed for memory) gives a row of NaNs with the
    exit code in its notes. Each row's notes hold ``x_torch`` when the ``torch_train`` row of its batch ran."""
    import multiprocessing

    mscs = {"off": [False], "on": [True], "both": [False, True]}[args.msc]
    settings = [(path, msc and path not in MSC_OFF_ONLY, batch) for msc in mscs for batch in args.train_batches
                for path in TRAIN_PATHS if path in args.paths and (path not in MSC_OFF_ONLY or msc is mscs[0])]
    rows, nan = [], float("nan")
    for path, msc, batch in settings:
        name = f"{path} b{batch} msc {'on' if msc else 'off'}"
        out = os.path.join(workdir, name.replace(" ", "_") + ".json")
        child = multiprocessing.get_context("spawn").Process(
            target=train_setting, args=(model_kwargs, args, path, msc, batch, out))
        child.start()
        child.join()
        if child.exitcode == 0:
            with open(out) as f:
                rows.append(dict(json.load(f), path=name, batch=batch))
        else:
            rows.append({"path": name, "batch": batch, "median_s": nan, "min_s": nan, "cpu_s": nan, "gflop": nan,
                         "gflop_per_s": nan, "x_matmul": nan, "peak_rss_mb": nan, "extra_mb": nan,
                         "notes": f"failed: exit code {child.exitcode}" + (
                             " (killed: out of memory?)" if child.exitcode == -9 else "")})
    torch_times = {r["batch"]: r["median_s"] for r in rows if r["path"].startswith("torch_train")}
    for row in rows:
        if row["batch"] in torch_times:
            ratio = row["median_s"] / torch_times[row["batch"]]
            row["notes"] = f"{row.get('notes', '')} x_torch={ratio:.2f}".strip()
    return rows


def print_table(rows, header):
    print(f"\n{header}")
    print(f"{'path':<28}{'median s':>10}{'min s':>9}{'cpu s':>8}{'GFLOP':>9}{'GFLOP/s':>9}{'x matmul':>10}"
          f"{'peak RSS MB':>13}{'+MB':>8}  notes")
    for r in rows:
        print(f"{r['path']:<28}{r['median_s']:>10.3f}{r['min_s']:>9.3f}{r['cpu_s']:>8.2f}{r['gflop']:>9.1f}"
              f"{r['gflop_per_s']:>9.1f}"
              f"{r['x_matmul']:>10.2f}{r['peak_rss_mb']:>13.0f}{r['extra_mb']:>8.0f}  {r.get('notes', '')}")
    sys.stdout.flush()


def start(args, name):
    """A benchmark's start: TensorFlow imported quietly with ``args.threads`` intra-op threads, and the work folder
    (``args.workdir``, created, or a new temporary ``deeplab-<name>-bench-*``). Returns ``(tf, workdir)``."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    workdir = args.workdir or tempfile.mkdtemp(prefix=f"deeplab-{name}-bench-")
    os.makedirs(workdir, exist_ok=True)
    return tf, workdir


def finish(args, result):
    """A benchmark's end: the load average recorded and printed, ``result`` written to ``args.json`` when given."""
    from deeplab_keras.files import atomic_write_json

    result["load_at_end"] = os.getloadavg()
    print(f"# load average {result['load_at_end'][0]:.2f} at the end", flush=True)
    if args.json:
        atomic_write_json(args.json, result, indent=1)
    return result


def main(argv=None):
    args = parse_args(argv)
    tf, workdir = start(args, "network")
    import keras
    import numpy as np

    import deeplab_keras as dk
    from deeplab_keras.export.verify import synthetic_images
    from flops import forward_flops

    model_kwargs = dict(TINY, num_classes=21) if args.tiny else dict(num_classes=21, backbone=args.backbone)
    if args.aspp:
        model_kwargs["aspp"] = args.aspp
    elif model_kwargs["backbone"] == "vgg16":
        model_kwargs["aspp"] = "largefov"
    args.paths, left_out = available_paths(args.paths, model_kwargs)
    load = os.getloadavg()
    print(f"# {os.cpu_count()} CPUs, {args.threads} threads, load average {load[0]:.2f} {load[1]:.2f} "
          f"{load[2]:.2f} at start; TF {tf.__version__}, Keras {keras.__version__}; model {model_kwargs}", flush=True)
    for note in left_out:
        print(f"# note: {note}", flush=True)
    result = {"args": vars(args), "load_at_start": load, "inference": [], "train": []}

    inference = [p for p in args.paths if p in INFERENCE_PATHS]
    if inference:
        keras.utils.set_random_seed(0)
        model = dk.DeepLabV2(**model_kwargs)
        flops = forward_flops(model, args.size, args.size)
        runners = inference_runners(model, model_kwargs, args, workdir, tf)
        images = synthetic_images((args.size, args.size), 2, seed=0)
        timed, matmuls = time_inference(runners, images, flops, args, tf)
        tf_times = np.array(timed["tf"]["times"]) if "tf" in timed else None
        torch_times = np.array(timed["torch"]["times"]) if "torch" in timed else None
        for name, row in timed.items():
            median = float(np.median(row["times"]))
            notes = dict(runners[name][1], labels_vs_first=round(row["labels_vs_first"], 4))
            if tf_times is not None:  # same-round ratios (robust to load drifts) and the ratio of the best times
                notes["x_tf"] = round(float(np.median(np.array(row["times"]) / tf_times)), 2)
                notes["x_tf_min"] = round(min(row["times"]) / tf_times.min(), 2)
            if torch_times is not None:
                notes["x_torch"] = round(float(np.median(np.array(row["times"]) / torch_times)), 2)
            result["inference"].append({
                "path": name, "median_s": median, "min_s": min(row["times"]), "cpu_s": float(np.median(row["cpu"])),
                "gflop": flops / 1e9,
                "gflop_per_s": flops / median / 1e9, "x_matmul": float(np.median(row["ratios"])),
                "peak_rss_mb": row["peak_rss"] / 1e6, "extra_mb": row["extra"] / 1e6,
                "notes": " ".join(f"{k}={v}" for k, v in notes.items())})
        best = {k: max(m[k] for m in matmuls) / 1e9 for k in matmuls[0]}
        result["matmul_gflop_per_s"] = best
        print_table(result["inference"], f"inference, {args.size}x{args.size}, batch 1, median of {args.repeats} "
                                         f"interleaved rounds; float32 matmul {args.matmul_n}: numpy "
                                         f"{best['numpy']:.1f}, TF {best['tf']:.1f} GFLOP/s (best round)")
        del runners, model
    if any(p in TRAIN_PATHS for p in args.paths):
        result["train"] = train_rows(model_kwargs, args, workdir)
        print_table(result["train"], f"training step, {args.train_size}x{args.train_size}, frozen BN, median of "
                                     f"{args.repeats} steps (FLOPs = 3x forward)")
    return finish(args, result)


if __name__ == "__main__":
    main()
