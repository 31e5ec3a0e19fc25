"""Dense CRF: the C++ TensorFlow op (deeplab_keras.crf.dense_crf) against pydensecrf, side by side in one run.

Headline: the 7 VOC 2012 samples packaged with deeplab_keras (500 x 281 .. 430), each at its own size, 21 labels,
DeepLab-like probabilities, 10 iterations, DeepLab v2 defaults: per sample both times (min of interleaved
repeats), the speed ratio, label agreement and max |diff|; overall the ratio of the summed times and the min /
median of the per-sample ratios; the same with the op on one thread (a fresh process). Then one 500x375 image
(2007_000063) in detail: min and median times, the peak memory each needs (measured in its own subprocess),
label agreement and |diff|; then the scaling over batch sizes 1..4 and
image sizes 250x188, 500x375, 1000x750, 2000x1500 with the peak memory of each side (RSS growth during one run,
in its own process) and the op's own estimate (``dk.crf.memory_estimate``, what it checks against its limit).
pydensecrf is single-threaded; the op uses TensorFlow's intra-op pool (all cores unless --threads). Times on a
shared machine are noisy: compare the ratios, measured side by side.

Usage: python benchmarks/crf_vs_pydensecrf.py [--repeats 5] [--threads N] [--quick] [--json out.json]
"""
import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
VOC = REPO / "deeplab_keras" / "data" / "samples" / "VOC2012"  # the VOC 2012 pairs packaged with deeplab_keras
SAMPLE = "2007_000063"  # 500 x 375
SAMPLES = tuple(sorted(path.stem for path in (VOC / "JPEGImages").glob("*.jpg")))
PARAMS = dict(bilateral_weight=4.0, bilateral_xy_std=67.0, bilateral_rgb_std=3.0, gaussian_weight=3.0,
              gaussian_xy_std=1.0)
ITERATIONS = 10


def make_inputs(width, height, classes=21, seed=0, noise=False, sample=SAMPLE):
    """VOC image ``sample`` resized to width x height (None: its own size) and DeepLab-like probabilities from its
    (blurred, coarse, noisy) labels; with ``noise`` the image is replaced by uniform noise (the bilateral lattice's
    worst case)."""
    import tensorflow as tf
    from PIL import Image
    from scipy import ndimage

    photo = Image.open(VOC / "JPEGImages" / f"{sample}.jpg").convert("RGB")
    if width is None:
        width, height = photo.size
    image = np.array(photo.resize((width, height), Image.BILINEAR))
    label = np.array(Image.open(VOC / "SegmentationClass" / f"{sample}.png").resize((width, height),
                                                                                     Image.NEAREST))
    nearest = ndimage.distance_transform_edt(label == 255, return_distances=False, return_indices=True)
    filled = np.minimum(label[tuple(nearest)], classes - 1)
    onehot = ndimage.gaussian_filter(np.eye(classes, dtype=np.float32)[filled], (12, 12, 0))
    coarse = tf.image.resize(onehot[None], ((height + 7) // 8, (width + 7) // 8), "area")
    rng = np.random.default_rng(seed)
    logits = 4.0 * coarse + rng.normal(0.0, 0.5, coarse.shape).astype(np.float32)
    probs = tf.nn.softmax(tf.image.resize(logits, (height, width), "bilinear"))[0].numpy()
    if noise:
        image = rng.integers(0, 256, image.shape, dtype=np.uint8)
    return image, probs.astype(np.float32)


def lattice_points(image):
    """Points of the bilateral permutohedral lattice of ``image`` at the DeepLab parameters (the op builds the same
    lattice; ``deeplab_keras.crf.lattice`` counts them)."""
    from deeplab_keras.crf import lattice

    height, width = image.shape[:2]
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    features = np.concatenate([np.stack([xs.ravel(), ys.ravel()], 1) / PARAMS["bilateral_xy_std"],
                               image.reshape(-1, 3) / PARAMS["bilateral_rgb_std"]], 1).astype(np.float32)
    return int(lattice.Lattice(features, np.zeros(height * width, np.int32)).num_vertices)


def run_pydensecrf(probs, image, iterations=ITERATIONS):
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_softmax

    h, w, c = probs.shape
    crf = dcrf.DenseCRF2D(w, h, c)
    crf.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probs.transpose(2, 0, 1))))
    crf.addPairwiseGaussian(sxy=PARAMS["gaussian_xy_std"], compat=PARAMS["gaussian_weight"])
    crf.addPairwiseBilateral(sxy=PARAMS["bilateral_xy_std"], srgb=PARAMS["bilateral_rgb_std"],
                             rgbim=np.ascontiguousarray(image), compat=PARAMS["bilateral_weight"])
    return np.array(crf.inference(iterations)).reshape(c, h, w).transpose(1, 2, 0)


def run_op(probs, images, iterations=ITERATIONS):
    import deeplab_keras as dk

    return dk.crf.dense_crf(probs, images, iterations=iterations, **PARAMS).numpy()


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def side_by_side(probs_list, images_list, repeats):
    """Interleaved repeats of pydensecrf (looping over the images) and the op (one batched call)."""
    probs, images = np.stack(probs_list), np.stack(images_list)
    run_op(probs[:1, :8, :8], images[:1, :8, :8])  # load the library, warm the thread pool
    ref_times, op_times = [], []
    ref = out = None
    for _ in range(repeats):
        t, ref = timed(lambda: np.stack([run_pydensecrf(p, im) for p, im in zip(probs_list, images_list)]))
        ref_times.append(t)
        t, out = timed(lambda: run_op(probs, images))
        op_times.append(t)
    return ref_times, op_times, ref, out


def memory_worker(kind, width, height, noise=False, points=False):
    """Subprocess body: prints the peak RSS growth during one run of `kind` over the RSS just before it (MiB): the
    process's own peak (ru_maxrss) when the run raised it, else RSS sampled every half millisecond (after a tiny
    warm-up run, so one-time runtime set-up is not counted). With ``points`` (op only) also the bilateral lattice's
    size and the op's estimates before and after building it."""
    import resource
    import threading

    import psutil

    image, probs = make_inputs(width, height, noise=noise)
    run = (lambda p, im: run_op(p[None], im[None])) if kind == "op" else run_pydensecrf
    run(probs[:8, :8], image[:8, :8])
    extra = {}
    if points:
        from deeplab_keras.crf import memory_estimate

        extra["points"] = lattice_points(image)
        extra["estimate_mib"] = memory_estimate([1, *probs.shape], bilateral_points=extra["points"])[0] / 2 ** 20
        extra["first_estimate_mib"] = memory_estimate([1, *probs.shape])[0] / 2 ** 20
    try:  # hand freed heap memory back to the OS, so that reusing it does not hide a run's allocations
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    process = psutil.Process()
    before = peak = process.memory_info().rss
    max_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    done = threading.Event()

    def sample():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, process.memory_info().rss)
            time.sleep(0.0005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    run(probs, image)
    done.set()
    sampler.join()
    peak = max(peak, process.memory_info().rss)
    max_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if max_after > max_before:
        peak = max(peak, max_after)
    print(json.dumps({"peak_mib": (peak - before) / 2 ** 20, **extra}))


def peak_memory(kind, width, height, threads, details=False, noise=False):
    """``memory_worker`` in a fresh process: the peak MiB (NaN if it failed), or its whole JSON with ``details``."""
    cmd = [sys.executable, __file__, "--memory-worker", kind, "--size", f"{width}x{height}"]
    cmd += (["--threads", str(threads)] if threads else []) + (["--noise"] if noise else [])
    cmd += ["--points"] if details else []
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=REPO)
    if details:
        assert result.returncode == 0, result.stderr[-2000:]
        return json.loads(result.stdout.strip().splitlines()[-1])
    if result.returncode != 0:
        return float("nan")
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_mib"]


def measure_samples(repeats):
    """Every packaged VOC sample at its own size: interleaved repeats (per round, each sample: pydensecrf, then
    the op on a batch of one). Per sample: times (ms), label agreement and max |diff|."""
    inputs = [make_inputs(None, None, sample=name) for name in SAMPLES]
    run_op(inputs[0][1][None, :8, :8], inputs[0][0][None, :8, :8])  # load the library, warm the thread pool
    rows = [{"sample": name, "size": f"{image.shape[1]}x{image.shape[0]}", "pydensecrf_ms": [], "op_ms": []}
            for name, (image, _) in zip(SAMPLES, inputs)]
    for _ in range(repeats):
        for row, (image, probs) in zip(rows, inputs):
            t, ref = timed(lambda: run_pydensecrf(probs, image))
            row["pydensecrf_ms"].append(t * 1e3)
            t, out = timed(lambda: run_op(probs[None], image[None])[0])
            row["op_ms"].append(t * 1e3)
            row["agreement"] = float((ref.argmax(-1) == out.argmax(-1)).mean())
            row["max_abs_diff"] = float(np.abs(ref - out).max())
    return rows


def summarize_samples(rows):
    """Per-sample ratios of the min times, their min and median, and the ratio of the summed min times."""
    ratios = [min(r["pydensecrf_ms"]) / min(r["op_ms"]) for r in rows]
    total_ref = sum(min(r["pydensecrf_ms"]) for r in rows)
    total_op = sum(min(r["op_ms"]) for r in rows)
    return {"ratios": ratios, "ratio_min": min(ratios), "ratio_median": statistics.median(ratios),
            "total_pydensecrf_ms": total_ref, "total_op_ms": total_op, "ratio_total": total_ref / total_op,
            "agreement_min": min(r["agreement"] for r in rows),
            "max_abs_diff": max(r["max_abs_diff"] for r in rows)}


def print_samples(rows, threads):
    summary = summarize_samples(rows)
    print(f"\nthe {len(rows)} packaged VOC samples, batch 1, op on {threads} thread(s); min of the interleaved repeats")
    print("  sample        size      pydensecrf ms   op ms    ratio   agreement   max |diff|")
    for row, ratio in zip(rows, summary["ratios"]):
        print(f"  {row['sample']}   {row['size']:8s} {min(row['pydensecrf_ms']):13.1f}   {min(row['op_ms']):6.1f}"
              f"   {ratio:5.2f}x   {row['agreement'] * 100:.4f} %   {row['max_abs_diff']:.2e}")
    print(f"  all {len(rows)}: pydensecrf {summary['total_pydensecrf_ms']:.1f} ms, op {summary['total_op_ms']:.1f} ms: "
          f"{summary['ratio_total']:.2f}x (summed times); per sample min {summary['ratio_min']:.2f}x, median "
          f"{summary['ratio_median']:.2f}x; labels {summary['agreement_min'] * 100:.4f} % (lowest), max |diff| "
          f"{summary['max_abs_diff']:.2e}   target >= 8x")
    return summary


def measure_headline(repeats):
    image, probs = make_inputs(500, 375)
    ref_t, op_t, ref, out = side_by_side([probs], [image], repeats)
    diff = np.abs(ref - out)
    return {"pydensecrf_ms": [t * 1e3 for t in ref_t], "op_ms": [t * 1e3 for t in op_t],
            "agreement": float((ref.argmax(-1) == out.argmax(-1)).mean()), "max_abs_diff": float(diff.max()),
            "mean_abs_diff": float(diff.mean())}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repeats per measurement (default 5)")
    parser.add_argument("--threads", type=int, default=0, help="TF intra-op threads (default 0: all cores)")
    parser.add_argument("--quick", action="store_true", help="2 repeats, skip the 1000x750 and 2000x1500 sizes")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    parser.add_argument("--memory-worker", choices=["op", "ref"], help=argparse.SUPPRESS)
    parser.add_argument("--headline-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--samples-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--size", default="500x375", help=argparse.SUPPRESS)
    parser.add_argument("--noise", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--points", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    from deeplab_keras.crf import memory_estimate

    if args.threads:
        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    if args.memory_worker:
        memory_worker(args.memory_worker, *map(int, args.size.split("x")), noise=args.noise, points=args.points)
        return 0
    repeats = 2 if args.quick else args.repeats
    if args.headline_only:
        print(json.dumps(measure_headline(repeats)))
        return 0
    if args.samples_only:
        print(json.dumps(measure_samples(repeats)))
        return 0
    threads = args.threads or os.cpu_count()
    print(f"dense CRF, 21 labels, {ITERATIONS} iterations, DeepLab defaults {PARAMS}")
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; op threads: {threads}; "
          f"pydensecrf: 1 thread; TF {tf.__version__}; {repeats} interleaved repeats")
    results = {"threads": threads, "cpus": os.cpu_count(), "load_average": os.getloadavg()[0]}

    rows = measure_samples(repeats)
    results["samples"] = {"rows": rows, **print_samples(rows, threads)}
    if not args.threads and (os.cpu_count() or 1) > 1:
        # The same with the op on one thread (a fresh process: TF fixes its pool size at start-up).
        child = subprocess.run([sys.executable, __file__, "--samples-only", "--threads", "1", "--repeats",
                                str(repeats)], capture_output=True, text=True, timeout=3600, cwd=REPO)
        if child.returncode == 0:
            rows = json.loads(child.stdout.strip().splitlines()[-1])
            results["samples_1_thread"] = {"rows": rows, **print_samples(rows, 1)}
        else:
            print(f"  (the one-thread run failed: {child.stderr[-500:]})")

    headline = measure_headline(repeats)
    ref_min, op_min = min(headline["pydensecrf_ms"]), min(headline["op_ms"])
    ref_med, op_med = statistics.median(headline["pydensecrf_ms"]), statistics.median(headline["op_ms"])
    print(f"\n500x375 image, batch 1 (op on {threads} threads)")
    print(f"  pydensecrf      : min {ref_min:8.1f} ms   median {ref_med:8.1f} ms")
    print(f"  dense_crf (op)  : min {op_min:8.1f} ms   median {op_med:8.1f} ms"
          f"   first call {headline['op_ms'][0]:.1f} ms"
          " (later calls reuse the cached Gaussian-kernel lattice of this image size)")
    print(f"  speed ratio     : {ref_min / op_min:.2f}x (min)   {ref_med / op_med:.2f}x (median)   target >= 4x")
    print(f"  label agreement : {headline['agreement'] * 100:.4f} %   |diff| max {headline['max_abs_diff']:.2e}  "
          f"mean {headline['mean_abs_diff']:.2e}")
    mem_ref, mem_op = peak_memory("ref", 500, 375, args.threads), peak_memory("op", 500, 375, args.threads)
    print(f"  peak memory     : pydensecrf {mem_ref:.0f} MiB   op {mem_op:.0f} MiB (RSS growth during one run)")
    headline.update(peak_mib_pydensecrf=mem_ref, peak_mib_op=mem_op)
    results["headline"] = headline
    if not args.threads and (os.cpu_count() or 1) > 1:
        # The same comparison with the op on one thread (a fresh process: TF fixes its pool size at start-up).
        child = subprocess.run([sys.executable, __file__, "--headline-only", "--threads", "1", "--repeats",
                                str(repeats)], capture_output=True, text=True, timeout=1800, cwd=REPO)
        if child.returncode == 0:
            one = json.loads(child.stdout.strip().splitlines()[-1])
            r1, o1 = min(one["pydensecrf_ms"]), min(one["op_ms"])
            print(f"  op on 1 thread  : min {o1:8.1f} ms (pydensecrf in that run {r1:.1f} ms): ratio {r1 / o1:.2f}x")
            results["headline_1_thread"] = one

    print("\nbatch scaling at 500x375 (pydensecrf loops over the images, the op takes one batch)")
    print("  batch   pydensecrf ms   op ms    ratio   agreement")
    results["batch"] = []
    for batch in (1, 2, 3, 4):
        cases = [make_inputs(500, 375, seed=s) for s in range(batch)]
        ref_t, op_t, ref, out = side_by_side([c[1] for c in cases], [c[0] for c in cases], max(1, repeats - 2))
        agree = (ref.argmax(-1) == out.argmax(-1)).mean()
        print(f"  {batch:5d}   {min(ref_t) * 1e3:13.1f}   {min(op_t) * 1e3:6.1f}   {min(ref_t) / min(op_t):5.2f}x"
              f"   {agree * 100:.4f} %")
        results["batch"].append({"batch": batch, "pydensecrf_ms": min(ref_t) * 1e3, "op_ms": min(op_t) * 1e3,
                                 "agreement": float(agree)})

    print("\nimage-size scaling (batch 1); peak memory = RSS growth during one run (MiB), each in its own process")
    print("  size         pydensecrf ms   op ms    ratio   agreement   peak pydensecrf   peak op   op estimate")
    results["sizes"] = []
    sizes = ((250, 188), (500, 375)) + (() if args.quick else ((1000, 750), (2000, 1500)))
    for width, height in sizes:
        image, probs = make_inputs(width, height)
        ref_t, op_t, ref, out = side_by_side([probs], [image], 1 if width > 1000 else max(1, repeats - 2))
        agree = float((ref.argmax(-1) == out.argmax(-1)).mean())
        del ref, out
        mem_ref = peak_memory("ref", width, height, args.threads)
        mem_op = peak_memory("op", width, height, args.threads)
        estimate = memory_estimate([1, height, width, probs.shape[-1]], iterations=ITERATIONS)[0] / 2 ** 20
        print(f"  {width}x{height:<8d} {min(ref_t) * 1e3:13.1f}   {min(op_t) * 1e3:6.1f}   "
              f"{min(ref_t) / min(op_t):5.2f}x   {agree * 100:.4f} %   {mem_ref:15.0f}   {mem_op:7.0f}   "
              f"{estimate:11.0f}")
        results["sizes"].append({"size": f"{width}x{height}", "pydensecrf_ms": min(ref_t) * 1e3,
                                 "op_ms": min(op_t) * 1e3, "agreement": agree, "peak_mib_pydensecrf": mem_ref,
                                 "peak_mib_op": mem_op, "estimate_mib_op": estimate})
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
