"""Peak memory of tiled inference against the whole image: a 2048x1024 image (Cityscapes' size) predicted at once
and as overlapping tiles (``deeplab_keras.inference.tiled_probabilities``), each in its own subprocess, side by side.

    python benchmarks/tiled_memory.py                                  # ResNet-50 at 1/4 width, tiles 513x513
    python benchmarks/tiled_memory.py --width 1.0 --tile 769 --classes 19   # the full ResNet-50

Each child builds the model (random weights: memory does not depend on them), runs a 65x65 warm-up, records its
resident set (``baseline``), predicts the image once and reports its peak RSS (``ru_maxrss``). The prediction's
share is ``peak - baseline``; the full-size probabilities ``[1, H, W, C]`` float32 are part of both. The ratio
printed is whole / tiled (> 1: tiling saves memory), with the wall time of both.
"""
import argparse
import json
import os
import pathlib
import resource
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

REPO = pathlib.Path(__file__).resolve().parents[1]


def _rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def child(args):
    """Runs one prediction and prints {"baseline_mb", "peak_mb", "seconds", "shape"} as JSON."""
    sys.path.insert(0, str(REPO))
    import numpy as np

    import deeplab_keras as dk
    from deeplab_keras.inference import predict_probabilities

    model = dk.DeepLabV2(num_classes=args.classes, backbone=args.backbone, width_multiplier=args.width)
    predict_probabilities(model, np.zeros((1, 65, 65, 3), np.float32))
    image = np.random.default_rng(0).integers(0, 256, (1, args.height, args.image_width, 3)).astype(np.float32)
    baseline = max(_rss_mb(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    start = time.perf_counter()
    tile = None if args.child == "whole" else (args.tile, args.tile)
    probs = predict_probabilities(model, image, tile_size=tile, tile_overlap=args.overlap)
    seconds = time.perf_counter() - start
    print(json.dumps({"baseline_mb": baseline, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "seconds": seconds, "shape": list(probs.shape)}))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="resnet50", choices=("resnet50", "resnet101", "vgg16"))
    parser.add_argument("--width", type=float, default=0.25, help="width multiplier (1.0: the full network)")
    parser.add_argument("--classes", type=int, default=19)
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument("--image-width", type=int, default=2048)
    parser.add_argument("--tile", type=int, default=513)
    parser.add_argument("--overlap", type=float, default=0.25)
    parser.add_argument("--child", choices=("whole", "tiled"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args)
    results = {}
    for mode in ("tiled", "whole"):
        cmd = [sys.executable, __file__, "--child", mode] + [a for a in (argv or sys.argv[1:])]
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
        if done.returncode:
            print(f"{mode}: the child failed (exit {done.returncode}; killed for memory if -9):\n"
                  f"{done.stderr.strip()[-2000:]}")
            return 1
        results[mode] = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"{args.backbone} width {args.width}, {args.classes} classes, image {args.height}x{args.image_width}, "
          f"tiles {args.tile}x{args.tile} overlap {args.overlap}")
    print(f"{'':8}{'baseline MB':>12}{'peak MB':>10}{'prediction MB':>15}{'seconds':>9}")
    for mode, r in results.items():
        print(f"{mode:8}{r['baseline_mb']:12.0f}{r['peak_mb']:10.0f}{r['peak_mb'] - r['baseline_mb']:15.0f}"
              f"{r['seconds']:9.1f}")
    whole, tiled = results["whole"], results["tiled"]
    print(f"whole / tiled: peak RSS {whole['peak_mb'] / tiled['peak_mb']:.2f}x, prediction memory "
          f"{(whole['peak_mb'] - whole['baseline_mb']) / max(tiled['peak_mb'] - tiled['baseline_mb'], 1):.2f}x, "
          f"time {whole['seconds'] / tiled['seconds']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
