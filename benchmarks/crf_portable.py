"""Latency of the portable dense CRF (stock TF ops) in TF, LiteRT and onnxruntime, next to the C++ op and
pydensecrf, measured side by side in one run (interleaved repeats; medians of wall and CPU time).

    python benchmarks/crf_portable.py                  # 500x375 VOC image, 21 labels, 10 iterations
    python benchmarks/crf_portable.py --repeats 5 --exact   # also the exact separable (x, y) Gaussian

CPU time is the process's user+system time over the call (all threads), so it is less sensitive to other
load on a shared machine than wall time; ratios are "x slower than pydensecrf" (> 1 is slower).
"""
import argparse
import os
import pathlib
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from PIL import Image  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from deeplab_keras.crf.portable import dense_crf_portable  # noqa: E402

VOC = REPO / "deeplab_keras" / "data" / "samples" / "VOC2012"  # the VOC 2012 pairs packaged with deeplab_keras


def load_inputs(name, num_classes, seed=0):
    """VOC image and DeepLab-like probabilities (ground truth at stride 8, upsampled, softened, noisy)."""
    image = np.array(Image.open(VOC / "JPEGImages" / f"{name}.jpg").convert("RGB"))
    label = np.array(Image.open(VOC / "SegmentationClass" / f"{name}.png"))
    label = np.where(label == 255, 0, label) % num_classes
    h, w = label.shape
    onehot = np.eye(num_classes, dtype=np.float32)[label]
    coarse = tf.image.resize(onehot[None], ((h + 7) // 8, (w + 7) // 8), "area")
    smooth = tf.image.resize(coarse, (h, w), "bilinear")[0].numpy()
    noise = np.random.default_rng(seed).normal(0.0, 0.8, smooth.shape)
    return image, tf.nn.softmax(4.0 * smooth + noise).numpy().astype(np.float32)


def traced(num_classes, iterations, gaussian_filter, runtime):
    @tf.function(input_signature=[tf.TensorSpec([None, None, None, num_classes], tf.float32),
                                  tf.TensorSpec([None, None, None, 3], tf.uint8)])
    def crf(probs, images):
        return dense_crf_portable(probs, images, iterations=iterations, gaussian_filter=gaussian_filter,
                                  runtime=runtime)
    return crf


def litert_runner(fn, probs, images, threads):
    from ai_edge_litert.interpreter import Interpreter

    t0 = time.time()
    converter = tf.lite.TFLiteConverter.from_concrete_functions([fn.get_concrete_function()], fn)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    model = converter.convert()
    convert_s = time.time() - t0
    interpreter = Interpreter(model_content=model, num_threads=threads)
    ins = interpreter.get_input_details()
    p_idx = next(d["index"] for d in ins if d["dtype"] == np.float32)
    i_idx = next(d["index"] for d in ins if d["dtype"] == np.uint8)
    interpreter.resize_tensor_input(p_idx, probs.shape)
    interpreter.resize_tensor_input(i_idx, images.shape)
    interpreter.allocate_tensors()
    out_idx = interpreter.get_output_details()[0]["index"]

    def run():
        interpreter.set_tensor(p_idx, probs)
        interpreter.set_tensor(i_idx, images)
        interpreter.invoke()
        return interpreter.get_tensor(out_idx)
    return run, convert_s, len(model)


def onnx_runner(fn, probs, images, threads):
    import onnxruntime as ort
    import tf2onnx

    t0 = time.time()
    model, _ = tf2onnx.convert.from_function(fn, input_signature=fn.input_signature, opset=17)
    convert_s = time.time() - t0
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    feed = {i.name: (probs if i.type == "tensor(float)" else images) for i in session.get_inputs()}
    return (lambda: session.run(None, feed)[0]), convert_s, model.ByteSize()


def pydensecrf_runner(probs, image, iterations):
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_softmax

    h, w, c = probs.shape
    unary = np.ascontiguousarray(unary_from_softmax(probs.transpose(2, 0, 1)))
    image = np.ascontiguousarray(image)

    def run():
        crf = dcrf.DenseCRF2D(w, h, c)
        crf.setUnaryEnergy(unary)
        crf.addPairwiseGaussian(sxy=1.0, compat=3.0)
        crf.addPairwiseBilateral(sxy=67.0, srgb=3.0, rgbim=image, compat=4.0)
        return np.array(crf.inference(iterations)).reshape(c, h, w).transpose(1, 2, 0)
    return run


def timed(fn):
    c0, t0 = time.process_time(), time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0, time.process_time() - c0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", default="2007_000063", help="VOC sample id (2007_000063 is 500x375)")
    parser.add_argument("--classes", type=int, default=21)
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--exact", action="store_true", help="also time gaussian_filter='exact' variants")
    parser.add_argument("--no-litert", action="store_true")
    parser.add_argument("--no-onnx", action="store_true")
    args = parser.parse_args(argv)

    image, probs = load_inputs(args.image, args.classes)
    h, w = image.shape[:2]
    batch_p, batch_i = probs[None], image[None]
    print(f"image {args.image} {w}x{h}, {args.classes} labels, {args.iterations} iterations, "
          f"{os.cpu_count()} CPUs, threads={args.threads}, TF {tf.__version__}")

    runners = {"pydensecrf": pydensecrf_runner(probs, image, args.iterations)}
    notes = {}
    try:
        from deeplab_keras.crf import dense_crf

        runners["C++ op (TF)"] = lambda: dense_crf(batch_p, batch_i, iterations=args.iterations).numpy()[0]
    except Exception as e:  # the op is optional here: report why it is missing
        notes["C++ op (TF)"] = f"unavailable: {type(e).__name__}: {e}"
    for mode in ["lattice"] + (["exact"] if args.exact else []):
        fn = traced(args.classes, args.iterations, mode, "tf")
        runners[f"portable/{mode} TF"] = lambda fn=fn: fn(batch_p, batch_i).numpy()[0]
        if not args.no_litert:
            run, conv_s, size = litert_runner(traced(args.classes, args.iterations, mode, "litert"),
                                              batch_p, batch_i, args.threads)
            runners[f"portable/{mode} LiteRT"] = lambda run=run: run()[0]
            notes[f"portable/{mode} LiteRT"] = f"convert {conv_s:.0f} s, {size / 1e3:.0f} kB"
        if not args.no_onnx:
            run, conv_s, size = onnx_runner(traced(args.classes, args.iterations, mode, "onnx"),
                                            batch_p, batch_i, args.threads)
            runners[f"portable/{mode} ORT"] = lambda run=run: run()[0]
            notes[f"portable/{mode} ORT"] = f"convert {conv_s:.0f} s, {size / 1e3:.0f} kB"

    outputs, walls, cpus = {}, {k: [] for k in runners}, {k: [] for k in runners}
    for name, run in runners.items():  # warm-up (tracing, allocation)
        outputs[name] = run()
    for _ in range(args.repeats):
        for name, run in runners.items():
            _, wall, cpu = timed(run)
            walls[name].append(wall)
            cpus[name].append(cpu)

    ref = outputs["pydensecrf"]
    ref_wall, ref_cpu = statistics.median(walls["pydensecrf"]), statistics.median(cpus["pydensecrf"])
    op = outputs.get("C++ op (TF)")
    print(f"\n{'method':24s} {'wall s':>7s} {'x ref':>6s} {'cpu s':>7s} {'x ref':>6s} {'agree':>8s} "
          f"{'max|d|':>8s} {'agree op':>8s}  notes")
    for name in runners:
        wall, cpu = statistics.median(walls[name]), statistics.median(cpus[name])
        out = outputs[name]
        agree = np.mean(out.argmax(-1) == ref.argmax(-1))
        diff = np.abs(out - ref).max()
        agree_op = f"{np.mean(out.argmax(-1) == op.argmax(-1)):.5f}" if op is not None else "-"
        print(f"{name:24s} {wall:7.2f} {wall / ref_wall:6.2f} {cpu:7.2f} {cpu / ref_cpu:6.2f} {agree:8.5f} "
              f"{diff:8.1e} {agree_op:>8s}  {notes.get(name, '')}")
    for name, note in notes.items():
        if name not in runners:
            print(f"{name:24s} {note}")


if __name__ == "__main__":
    main()
