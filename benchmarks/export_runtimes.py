"""Latency per image of the exported DeepLab graph in each runtime, side by side in one run, with file sizes.

Same model, same 513x513 images, same computation in every runtime (``deeplab_keras.export.serving.serving_outputs``:
logits -> bilinear resize to the input size -> softmax + argmax): Keras/TF (a ``tf.function`` over the Keras
model), the SavedModel (``tf.saved_model.load``), TFLite through the LiteRT interpreter with XNNPACK (float32 static
and dynamic input size, float16, full int8) and onnxruntime (static and dynamic input size, int8 QDQ). The exports
use the serving graph (``deeplab_keras/graph_rewrite.py``: native dilated convolutions, batch norm folded, plain ASPP
head); the ``_fused`` rows use the fused ASPP head, ``saved_model_unfolded`` keeps batch norm unfolded, ``keras_tf``
is the Keras model as trained (SpaceToBatch around each atrous convolution). Runtimes are timed in interleaved rounds
(one image each per round, each round also timing an n x n float32 matmul) so that load changes on a shared machine
hit all of them alike; the table reports the median per image, the ratio to Keras/TF and ``x matmul``: the runtime's
FLOP rate (``flops.forward_flops``) over the best float32 matmul rate of the same round (median over rounds).
Targets: TFLite fp32 and onnxruntime <= 1.0x TF; SavedModel >= 0.85x matmul.

Usage:
    python benchmarks/export_runtimes.py                       # ResNet-101 ASPP-L and a small config, 513x513
    python benchmarks/export_runtimes.py --configs small --rounds 3 --size 321 321
    python benchmarks/export_runtimes.py --threads 4 --json results.json
"""
import argparse
import json
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

CONFIGS = {
    "resnet101-L": dict(backbone="resnet101", aspp="L", output_stride=8),
    "small": dict(backbone="resnet50", aspp="S", output_stride=8, width_multiplier=0.25),
    "tiny": dict(backbone="resnet50", aspp="S", output_stride=8, width_multiplier=0.125, stage_blocks=(1, 1, 1, 1)),
}
RUNTIMES = ("keras_tf", "saved_model", "saved_model_fused", "saved_model_unfolded", "tflite_fp32",
            "tflite_fp32_dynamic", "tflite_fp16", "tflite_int8", "onnxruntime", "onnxruntime_dynamic",
            "onnxruntime_fused", "onnxruntime_int8")
#: SavedModel / ONNX variants: (graph options, quantize, static input size)
SAVED_MODELS = {"saved_model": {}, "saved_model_fused": {"aspp_head": "fused"},
                "saved_model_unfolded": {"fold_batch_norm": False}}
ONNX_VARIANTS = {"onnxruntime": ({}, "none", True), "onnxruntime_dynamic": ({}, "none", False),
                 "onnxruntime_fused": ({"aspp_head": "fused"}, "none", True), "onnxruntime_int8": ({}, "int8", True)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", nargs="+", default=["resnet101-L", "small"], choices=sorted(CONFIGS))
    p.add_argument("--runtimes", nargs="+", default=list(RUNTIMES), choices=RUNTIMES)
    p.add_argument("--size", type=int, nargs=2, default=(513, 513), metavar=("H", "W"))
    p.add_argument("--num-classes", type=int, default=21)
    p.add_argument("--rounds", type=int, default=5, help="timed rounds (one image per runtime per round)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="intra-op threads for every runtime")
    p.add_argument("--calibration", type=int, default=4, help="int8 calibration images")
    p.add_argument("--matmul-n", type=int, default=2048, help="side of the float32 matmul timed each round")
    p.add_argument("--workdir", help="where artifacts are written (default a temporary directory)")
    p.add_argument("--json", help="also write the results here")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import numpy as np
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    import keras

    import deeplab_keras as dk
    from deeplab_keras.export import onnx as onnx_export, saved_model, serving, tflite, verify
    from deeplab_keras.export.report import Progress
    from flops import forward_flops
    from network import matmul_rates

    workdir = args.workdir or tempfile.mkdtemp(prefix="deeplab-export-bench-")
    size = tuple(args.size)
    images = verify.synthetic_images(size, 2, seed=0).astype(np.float32)
    progress = Progress(True)
    results = {"size": list(size), "threads": args.threads, "rounds": args.rounds, "configs": {}}
    print(f"# {os.cpu_count()} CPUs, {args.threads} threads per runtime, {size[0]}x{size[1]} input, "
          f"TF {tf.__version__}, workdir {workdir}", flush=True)

    for name in args.configs:
        keras.utils.set_random_seed(0)
        model = dk.DeepLabV2(num_classes=args.num_classes, **CONFIGS[name])
        base = os.path.join(workdir, name)
        os.makedirs(base, exist_ok=True)
        runners, sizes, notes = {}, {}, {}
        progress.info(f"== {name}: {model.count_params() / 1e6:.1f} M parameters")

        if "keras_tf" in args.runtimes:
            serve = tf.function(lambda x: serving.serving_outputs(model, x))  # traced for the benchmark's shape
            runners["keras_tf"] = lambda x, f=serve: f(tf.constant(x))["labels"].numpy()
            keras_path = os.path.join(base, "model.keras")
            model.save(keras_path)
            sizes["keras_tf"] = os.path.getsize(keras_path)
        for key, graph_options in SAVED_MODELS.items():
            if key not in args.runtimes:
                continue
            report = saved_model.export_saved_model(model, os.path.join(base, key), overwrite=True, version=1,
                                                    num_samples=1, progress=progress, **graph_options)
            loaded = tf.saved_model.load(os.path.join(base, key, "1"))
            fn = loaded.signatures["serving_default"]
            runners[key] = lambda x, f=fn, keep=loaded: f(image=tf.constant(x.astype(np.uint8)))["labels"].numpy()
            sizes[key] = report["size_bytes"]
            notes[key] = report["graph_rewrites"]
        tfl = {"tflite_fp32": ("none", size), "tflite_fp32_dynamic": ("none", None),
               "tflite_fp16": ("float16", size), "tflite_int8": ("int8", size)}
        for key, (quantize, input_size) in tfl.items():
            if key not in args.runtimes:
                continue
            path = os.path.join(base, key + ".tflite")
            report = tflite.export_tflite(model, path, quantize=quantize, input_size=input_size, overwrite=True,
                                          num_samples=1, verify_size=(129, 129), num_calibration=args.calibration,
                                          progress=progress, num_threads=args.threads)
            runner = tflite.TFLiteRunner(path, num_threads=args.threads)
            runners[key] = lambda x, r=runner: r(x)["labels"]
            sizes[key] = report["size_bytes"]
            notes[key] = report["verification"]["checks"]["tflite"]
        for key, (graph_options, quantize, static) in ONNX_VARIANTS.items():
            if key not in args.runtimes:
                continue
            path = os.path.join(base, key + ".onnx")
            report = onnx_export.export_onnx(model, path, input_size=size if static else None, overwrite=True,
                                             num_samples=1, verify_size=(129, 129), progress=progress,
                                             quantize=quantize, num_calibration=args.calibration, **graph_options)
            session = onnx_export.make_session(path, num_threads=args.threads)
            runners[key] = lambda x, s=session: onnx_export.run_onnx(s, x)["labels"]
            sizes[key] = report["size_bytes"]
            graph = report["graph"]
            notes[key] = {"nodes": graph["nodes"], "conv": graph["conv_nodes"],
                          "dilated_conv": graph["dilated_conv_nodes"],
                          "space_to_depth": graph["space_to_depth_nodes"], **report["graph_rewrites"]}

        times, matmuls = {key: [] for key in runners}, []
        flops = forward_flops(model, *size)
        reference = runners["keras_tf"](images[:1]) if "keras_tf" in runners else None
        agreement = {}
        for key, run in runners.items():  # warm-up (first-call allocation / graph tracing) + label agreement
            labels = run(images[:1])
            if reference is not None:
                agreement[key] = float(np.mean(labels == reference))
        progress.info(f"timing {len(runners)} runtimes x {args.rounds} rounds")
        for r in range(args.rounds):
            matmuls.append(max(matmul_rates(args.matmul_n, tf).values()))
            for key, run in runners.items():
                x = images[(r + 1) % len(images)][None]
                start = time.perf_counter()
                run(x)
                times[key].append(time.perf_counter() - start)
        table = {}
        tf_ms = 1000 * float(np.median(times["keras_tf"])) if "keras_tf" in times else None
        tf_size = sizes.get("keras_tf")
        for key in runners:
            ms = 1000 * float(np.median(times[key]))
            x_matmul = float(np.median([flops / t / m for t, m in zip(times[key], matmuls)]))
            table[key] = {"median_ms": round(ms, 1), "min_ms": round(1000 * min(times[key]), 1),
                          "ratio_vs_tf": round(ms / tf_ms, 2) if tf_ms else None, "x_matmul": round(x_matmul, 2),
                          "size_mb": round(sizes[key] / 1e6, 2),
                          "size_ratio_vs_tf": round(sizes[key] / tf_size, 2) if tf_size else None,
                          "label_agreement_vs_tf": agreement.get(key), "notes": notes.get(key)}
        results["configs"][name] = {"params": model.count_params(), "gflop": round(flops / 1e9, 2),
                                    "matmul_gflops": [round(m / 1e9, 1) for m in matmuls], "runtimes": table}
        print(f"\n{name} ({model.count_params() / 1e6:.1f} M params), {size[0]}x{size[1]}, batch 1, "
              f"{args.threads} threads, median of {args.rounds}:")
        print(f"{'runtime':<22}{'ms/image':>10}{'min ms':>10}{'x TF':>8}{'x matmul':>10}{'MB':>9}{'size x TF':>11}"
              f"{'labels=TF':>11}")
        for key, row in table.items():
            agree = row["label_agreement_vs_tf"]
            print(f"{key:<22}{row['median_ms']:>10.1f}{row['min_ms']:>10.1f}"
                  f"{row['ratio_vs_tf'] if row['ratio_vs_tf'] is not None else float('nan'):>8.2f}"
                  f"{row['x_matmul']:>10.2f}"
                  f"{row['size_mb']:>9.2f}{row['size_ratio_vs_tf'] or float('nan'):>11.2f}"
                  f"{100 * agree if agree is not None else float('nan'):>10.2f}%")
        for key in ("tflite_fp32", "onnxruntime"):
            if key in table and table[key]["ratio_vs_tf"] is not None:
                verdict = "meets" if table[key]["ratio_vs_tf"] <= 1.0 else "MISSES"
                print(f"target {key} <= 1.0x TF: {table[key]['ratio_vs_tf']:.2f}x ({verdict})")
        if "saved_model" in table:
            verdict = "meets" if table["saved_model"]["x_matmul"] >= 0.85 else "MISSES"
            print(f"target saved_model >= 0.85x matmul: {table['saved_model']['x_matmul']:.2f}x ({verdict})")
        for key, row in table.items():
            if row["notes"]:
                print(f"  {key}: {row['notes']}")
        sys.stdout.flush()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
