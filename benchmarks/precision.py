"""Inference precision on this machine: float32 against bfloat16 (``--precision bf16``), side by side in one run,
with the PyTorch peer (``torch_deeplab.py``, float32 and bfloat16 autocast) as the yardstick.

Two models, each path compared with the package's float32 on the same inputs:

1. **a trained model**: the demo's ``tiny_cpu`` config trained from scratch (``--steps``, default the config's
   600; or ``--checkpoint`` a trained ``.keras``), evaluated on its 40 held-out synthetic images
   (``deeplab_keras.evaluate.evaluate``): mIoU against the ground truth, and the labels' agreement with float32;
2. **a converted DeepLab v2 file**: the ResNet-101 ASPP-L ``.caffemodel`` that ``../shared/tools/make_caffemodel.py``
   writes (the released file format, synthetic weights, calibrated batch norm) run on the 2 VOC images of
   ``../shared/data/caffe-reference/`` padded to 513x513 as the paper tests (and resized to 321x321): time per image
   (median of ``--repeats`` interleaved rounds), label agreement and mIoU against float32's labels, and against the
   labels of the reference logits an independent PyTorch port computed from the same file.

Labels are compared at full resolution (logits -> corner-aligned resize -> argmax, the exported computation);
``miou_vs_fp32`` treats float32's labels as the ground truth. ``x_torch``: the path's time over the float32 torch
peer's in the same rounds. bfloat16 paths are left out (with a note) on a CPU without ``avx512_bf16`` / AMX, the
torch paths without torch (``pip install -r benchmarks/requirements.txt``), the converted file without
``../shared``.

Usage:
    python benchmarks/precision.py                       # both parts (~15 min on 2 idle cores: training, 513 px)
    python benchmarks/precision.py --checkpoint runs/demo/run/model.keras --repeats 3
    python benchmarks/precision.py --skip-trained --json out.json
"""
import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from network import available_paths, finish, start, torch_peer  # noqa: E402

SHARED = os.path.join(os.path.dirname(os.path.dirname(HERE)), "shared")
IMAGES = ("2007_000033", "2008_000009")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", help="a trained .keras for part 1 (default: train tiny_cpu here)")
    p.add_argument("--steps", type=int, default=None, help="training steps of tiny_cpu (default the config's 600)")
    p.add_argument("--skip-trained", action="store_true", help="leave out part 1")
    p.add_argument("--skip-converted", action="store_true", help="leave out part 2")
    p.add_argument("--repeats", type=int, default=2, help="timed rounds of part 2 (default 2)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="intra-op threads of TF and torch")
    p.add_argument("--workdir", help="where the training run and the .caffemodel go (default a temporary folder)")
    p.add_argument("--json", help="also write the results here")
    return p.parse_args(argv)


def agreement(labels, reference, num_classes):
    """``(fraction of equal labels, mIoU of labels against reference)``."""
    import numpy as np

    from deeplab_keras.evaluate import confusion_matrix, scores

    labels, reference = np.asarray(labels), np.asarray(reference)
    miou = scores(confusion_matrix(reference.ravel(), labels.ravel(), num_classes))["miou"]
    return float(np.mean(labels == reference)), float(miou)


def precisions():
    """The package's precisions this CPU runs (float32, and bf16 where native)."""
    from deeplab_keras.precision import bf16_supported

    return ["float32"] + (["bf16"] if bf16_supported() else [])


def trained_part(args, workdir):
    """Part 1: ``{precision: {miou, labels_vs_fp32, miou_vs_fp32, seconds}}`` on the held-out synthetic split."""
    import numpy as np

    from deeplab_keras.evaluate import evaluate
    from deeplab_keras.weights import load_model
    from deeplab_keras.train import load_config, load_datasets, train

    overrides = {"runtime": {"run_dir": os.path.join(workdir, "tiny_run"), "verbose": 0, "tensorboard": False,
                             "plot": False}}
    if args.steps:
        overrides["schedule"] = {"steps": args.steps}
    cfg = load_config("tiny_cpu", overrides)
    model = load_model(args.checkpoint) if args.checkpoint else train(cfg).model
    _, val = load_datasets(cfg)
    examples = [(np.asarray(e["image"]), np.asarray(e["label"])) for e in _unbatched(val)]
    rows, fp32_labels = {}, None
    for precision in precisions():
        start = time.perf_counter()
        result = evaluate(model, [{"image": i, "label": lab} for i, lab in examples], cfg.model.num_classes,
                          progress=False, precision=precision)
        seconds = time.perf_counter() - start
        labels = _predicted_labels(model, [i for i, _ in examples], precision)
        fp32_labels = labels if fp32_labels is None else fp32_labels
        same, miou = agreement(labels, fp32_labels, cfg.model.num_classes)
        rows[precision] = {"miou": result["no_crf"]["miou"], "labels_vs_fp32": same, "miou_vs_fp32": miou,
                           "seconds": seconds, "images": result["images"]}
    return rows


def _unbatched(dataset):
    for element in dataset.as_numpy_iterator():
        images, labels = (element["image"], element["label"]) if isinstance(element, dict) else element
        if images.ndim == 3:
            images, labels = images[None], labels[None]
        yield from ({"image": i, "label": lab.squeeze()} for i, lab in zip(images, labels))


def _predicted_labels(model, images, precision):
    import numpy as np

    from deeplab_keras.inference import Predictor

    predictor = Predictor(model, precision=precision)
    return np.stack([predictor(i[None].astype(np.float32)).numpy()[0].argmax(-1) for i in images])


def converted_part(args, workdir):
    """Part 2: the converted ResNet-101 file on the reference inputs; ``{input kind: {path: row}}``."""
    import subprocess

    import numpy as np

    import deeplab_keras as dk
    from deeplab_keras.evaluate import pad_image
    from deeplab_keras.inference import Predictor, upsample_logits
    from deeplab_keras.weights.caffe import caffemodel_config, load_caffemodel

    path = os.path.join(workdir, "resnet101.caffemodel")
    if not os.path.exists(path):
        subprocess.run([sys.executable, os.path.join(SHARED, "tools", "make_caffemodel.py"), "resnet101", path],
                       check=True, capture_output=True)
    model = dk.DeepLabV2(**caffemodel_config(path))
    load_caffemodel(model, path)
    with np.load(os.path.join(SHARED, "data", "caffe-reference", "reference_logits.npz")) as z:
        ref = {k: z[k] for k in z.files}
    kwargs = dict(num_classes=model.num_classes, backbone="resnet101")
    paths, _ = available_paths(["torch", "tf_bf16"], kwargs)
    runners = {p: Predictor(model, precision=p) for p in precisions()}
    if "torch" in paths:
        import torch

        from torch_deeplab import inference_fn

        torch.set_num_threads(args.threads)
        net = torch_peer(kwargs, model)
        runners["torch"] = inference_fn(net)
        if "tf_bf16" in paths:
            runners["torch_bf16"] = inference_fn(net, torch.bfloat16)
    out = {}
    for kind in ("pad513", "r321"):
        inputs = {name: (pad_image(ref[f"input/{name}/native"], 513) if kind == "pad513" else
                         ref[f"input/{name}/r321"]).astype(np.float32)[None] for name in IMAGES}
        reference = {name: upsample_logits(ref[f"single/{name}/{kind}"], inputs[name].shape[1:3]).numpy()[0].argmax(-1)
                     for name in IMAGES}
        out[kind] = _compare(runners, inputs, reference, model.num_classes, args.repeats)
    return out


def _labels(run, x):
    import numpy as np

    result = run(x)
    result = np.asarray(result)
    return result[0] if result.ndim == 3 else result[0].argmax(-1)


def _compare(runners, inputs, reference, num_classes, repeats):
    """Interleaved timing rounds of every runner on every input; agreement with float32 and the reference."""
    import numpy as np

    labels = {p: {n: _labels(run, x) for n, x in inputs.items()} for p, run in runners.items()}  # warm-up too
    times = {p: [] for p in runners}
    for _ in range(repeats):
        for p, run in runners.items():
            start = time.perf_counter()
            for x in inputs.values():
                _labels(run, x)
            times[p].append((time.perf_counter() - start) / len(inputs))
    rows = {}
    flat = lambda d: np.concatenate([v.ravel() for v in d.values()])  # noqa: E731
    for p in runners:
        same, miou = agreement(flat(labels[p]), flat(labels["float32"]), num_classes)
        same_ref, miou_ref = agreement(flat(labels[p]), flat(reference), num_classes)
        rows[p] = {"seconds": float(np.median(times[p])), "labels_vs_fp32": same, "miou_vs_fp32": miou,
                   "labels_vs_reference": same_ref, "miou_vs_reference": miou_ref}
        if "torch" in times:
            rows[p]["x_torch"] = float(np.median(np.array(times[p]) / np.array(times["torch"])))
        if p != "float32":
            rows[p]["x_fp32"] = float(np.median(np.array(times[p]) / np.array(times["float32"])))
    return rows


def print_rows(title, rows):
    print(f"\n{title}")
    keys = sorted({k for r in rows.values() for k in r}, key=lambda k: (k != "seconds", k))
    print(f"{'path':<12}" + "".join(f"{k:>20}" for k in keys))
    for path, row in rows.items():
        print(f"{path:<12}" + "".join(f"{row[k]:>20.4f}" if k in row else f"{'':>20}" for k in keys))
    sys.stdout.flush()


def main(argv=None):
    args = parse_args(argv)
    _, workdir = start(args, "precision")
    load = os.getloadavg()
    print(f"# {os.cpu_count()} CPUs, {args.threads} threads, load average {load[0]:.2f} at start; precisions "
          f"{precisions()}", flush=True)
    result = {"load_at_start": load}
    if not args.skip_trained:
        result["trained"] = trained_part(args, workdir)
        print_rows("1. trained tiny_cpu model, 40 held-out synthetic images (97x97)", result["trained"])
    if not args.skip_converted:
        if not os.path.isdir(SHARED):
            print(f"# note: {SHARED} is absent: no converted-file part", flush=True)
        else:
            result["converted"] = converted_part(args, workdir)
            for kind, rows in result["converted"].items():
                print_rows(f"2. converted DeepLab v2 ResNet-101 (.caffemodel), 2 VOC images, {kind}, seconds per "
                           f"image (median of {args.repeats} rounds)", rows)
    return finish(args, result)


if __name__ == "__main__":
    main()
