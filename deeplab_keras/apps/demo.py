"""The demo application behind ``deeplab demo`` (:mod:`deeplab_keras.cli.demo`): the whole story on an embedded
default, on a CPU, in a few minutes.

1. train a tiny DeepLab (packaged ``tiny_cpu`` config) on the synthetic dataset;
2. evaluate mIoU on its held-out split with and without the dense CRF;
3. on real VOC 2012 samples (the package's own, :func:`deeplab_keras.data.sample_data_dir`, or ``--data DIR``
   holding ``VOC2012/``): refine coarse output-stride-8 predictions (ground truth downsampled to the logits grid,
   softened and noised — what a DeepLab score map looks like) with the CRF and report mIoU before / after;
4. export SavedModel, TFLite and ONNX, each verified in its own runtime against the Keras model;
5. predict on held-out images with ``deeplab-predict``'s code (masks, overlays before / after CRF);
6. write ``report.json``, the training curve and overlay PNGs into ``--out``.

Example:
    $ deeplab-demo --out deeplab_report
"""
import json
import os
import shutil
import time

import numpy as np
import tensorflow as tf

from deeplab_keras import crf
from deeplab_keras.data import sample_data_dir
from deeplab_keras.data._common import read_image_rgb, read_index_png
from deeplab_keras.data.synthetic import write_synthetic_folder
from deeplab_keras.evaluate import confusion_matrix, evaluate, format_table, scores
from deeplab_keras.export import export_onnx, export_saved_model, export_tflite
from deeplab_keras.export.common import Progress
from deeplab_keras.files import atomic_write_bytes
from deeplab_keras.inference import predict_probabilities
from deeplab_keras.predict import overlay, png_bytes, predict_files, read_image
from deeplab_keras.train import load_config, load_datasets, train


def coarse_probabilities(label, num_classes, stride=8, temperature=2.0, noise=1.0, seed=0):
    """Simulated DeepLab score map: one-hot ground truth averaged over ``stride`` x ``stride`` cells (the
    logits grid), noised, bilinearly upsampled back and softened by ``temperature``.

    Args:
        label: uint8 [H, W] ground truth (255 = ignore, treated as background).
        num_classes: number of classes.
        stride: output stride of the simulated network.
        temperature: softmax temperature applied to the log of the cell averages.
        noise: std of Gaussian noise added to the logits.
        seed: noise seed.

    Returns:
        float32 [H, W, C] probabilities.
    """
    h, w = label.shape
    onehot = np.eye(num_classes, dtype=np.float32)[np.where(label == 255, 0, label)]
    coarse = tf.image.resize(onehot[None], ((h + stride - 1) // stride, (w + stride - 1) // stride), method="area")
    logits = np.log(np.asarray(coarse)[0] + 0.05) * temperature
    logits += np.random.RandomState(seed).normal(0, noise, logits.shape).astype(np.float32)
    logits = tf.image.resize(logits[None], (h, w), method="bilinear")
    return np.asarray(tf.nn.softmax(logits, axis=-1))[0]


def voc_crf_study(data, out_dir, crf_params=None):
    """mIoU of simulated coarse predictions (:func:`coarse_probabilities`) before / after the dense CRF.

    Args:
        data: folder holding ``VOC2012/`` (JPEGImages/*.jpg, SegmentationClass/*.png), e.g. ``sample_data_dir()``.
        out_dir: folder (created) for the overlays of the first 3 images (``voc_<id>_coarse_vs_crf.png``).
        crf_params: a ``crf.CRFParams``, a dict of some of its fields, or None (DeepLab v2's).

    Returns:
        ``{"no_crf": mIoU, "crf": mIoU, "images": count}``.

    Example:
        >>> voc_crf_study(sample_data_dir(), "/tmp/demo")["images"]     # doctest: +SKIP
        3
    """
    root = _voc_root(data)
    os.makedirs(out_dir, exist_ok=True)
    ids = sorted(n[:-4] for n in os.listdir(os.path.join(root, "SegmentationClass")) if n.endswith(".png"))
    cms = {"no_crf": 0, "crf": 0}
    for i, name in enumerate(ids):
        image = read_image_rgb(os.path.join(root, "JPEGImages", name + ".jpg"))
        label = read_index_png(os.path.join(root, "SegmentationClass", name + ".png"))
        probs = coarse_probabilities(label, 21, seed=i)
        refined = np.asarray(crf.dense_crf(probs[None], image[None], crf_params))[0]
        before, after = probs.argmax(-1), refined.argmax(-1)
        cms["no_crf"] = cms["no_crf"] + confusion_matrix(label, before, 21)
        cms["crf"] = cms["crf"] + confusion_matrix(label, after, 21)
        if i < 3:
            picture = _before_after(image, before, after)
            atomic_write_bytes(os.path.join(out_dir, f"voc_{name}_coarse_vs_crf.png"), png_bytes(picture), True)
    return {k: round(scores(cm)["miou"], 4) for k, cm in cms.items()} | {"images": len(ids)}


def _voc_root(data):
    """``data/VOC2012`` (a folder with SegmentationClass/), or FileNotFoundError naming ``data``."""
    root = os.path.join(os.fspath(data), "VOC2012")
    if not os.path.isdir(os.path.join(root, "SegmentationClass")):
        raise FileNotFoundError(f"data folder {data} holds no VOC2012/SegmentationClass/; give the folder that holds "
                                "VOC2012/ (JPEGImages/, SegmentationClass/)")
    return root


def run(out="deeplab_report", steps=None, data=None, overwrite=False, log=print):
    """Runs the demo and returns the report dict (also written to ``out/report.json``).

    Leaves the global Keras dtype policy as it found it (training sets its own in a scope; exports convert to
    float32 themselves).

    Args:
        out: report folder.
        steps: training steps (None: the ``tiny_cpu`` config's).
        data: folder holding ``VOC2012/`` for the CRF study (None: the packaged samples, ``sample_data_dir()``).
        overwrite: replace an existing report in ``out``.
        log: called with each progress line.

    Example:
        >>> report = run("/tmp/deeplab_report", steps=20)      # doctest: +SKIP
    """
    data, out = _checked_destination(data, out, overwrite)
    start, report = time.time(), {}

    log("[1/6] training a tiny DeepLab on the synthetic dataset (packaged config tiny_cpu)")
    cfg, model, report["train"] = _train_tiny(out, steps, overwrite, start)

    log("[2/6] evaluating on the held-out synthetic split, without and with the CRF")
    report["eval_synthetic"] = _evaluate_synthetic(model, cfg, log)

    log(f"[3/6] CRF on coarse (output stride 8) score maps of the VOC samples in {data}")
    study = report["voc_samples_crf"] = voc_crf_study(data, out) | {"data": data}
    log(f"      mIoU before CRF {study['no_crf']:.4f}, after {study['crf']:.4f}")

    log("[4/6] exporting SavedModel, TFLite and ONNX; each is verified against the Keras model")
    samples = _sample_folder(out, cfg)
    report["export"] = _export_all(model, os.path.join(out, "export"), os.path.join(samples, "images"))

    log("[5/6] predicting masks and overlays (before / after CRF) for the held-out images")
    report["predict"] = _predict_samples(model, os.path.join(samples, "images"), out)

    log("[6/6] writing the report")
    _write_report(out, cfg, report, start)
    log(f"done in {report['seconds']} s: synthetic mIoU {report['eval_synthetic']['miou']:.4f} "
        f"(CRF {report['eval_synthetic']['miou_crf']:.4f}); report in {out}/report.json")
    return report


def _checked_destination(data, out, overwrite):
    """(data, out) as absolute paths, refusing a data folder without VOC2012/ and an existing report; creates out."""
    data = os.path.abspath(data if data is not None else sample_data_dir())
    _voc_root(data)  # refused now, not after training
    out = os.path.abspath(out)
    if os.path.exists(os.path.join(out, "report.json")) and not overwrite:
        raise FileExistsError(f"{out} already holds a report; pass --overwrite or another --out")
    os.makedirs(out, exist_ok=True)
    return data, out


def _train_tiny(out, steps, overwrite, start):
    """Step 1: trains the packaged ``tiny_cpu`` config into ``out/run``; returns (config, model, report section)."""
    overrides = {"runtime": {"run_dir": os.path.join(out, "run"), "verbose": 2, "tensorboard": False}}
    if overwrite and os.path.isdir(overrides["runtime"]["run_dir"]):  # a fresh run: --steps may differ
        shutil.rmtree(overrides["runtime"]["run_dir"])
    if steps:
        overrides["schedule"] = {"steps": int(steps)}
    cfg = load_config("tiny_cpu", overrides)
    result = train(cfg)
    section = {"steps": cfg.schedule.steps, "batch_size": cfg.data.batch_size, "seconds": round(time.time() - start, 1),
               "model_path": result.model_path, "history": {k: [round(float(x), 4) for x in v]
                                                            for k, v in result.history.items()}}
    return cfg, result.model, section


def _evaluate_synthetic(model, cfg, log):
    """Step 2: mIoU on the held-out synthetic split without and with the CRF (the table goes to ``log``)."""
    _, val = load_datasets(cfg)
    t = time.time()
    results = evaluate(model, val, cfg.model.num_classes, crf=True, progress=False)
    log(format_table(results))
    return {"miou": results["no_crf"]["miou"], "miou_crf": results["crf"]["miou"],
            "pixel_accuracy": results["no_crf"]["pixel_accuracy"], "images": results["images"],
            "seconds": round(time.time() - t, 1)}


def _sample_folder(out, cfg):
    """``out/samples``: 6 held-out synthetic images and labels (written unless the folder exists)."""
    folder = os.path.join(out, "samples")
    if os.path.isdir(folder):
        return folder
    return write_synthetic_folder(folder, 6, size=tuple(cfg.data.synthetic_size), num_classes=cfg.model.num_classes,
                                  seed=cfg.runtime.seed + 7)


def _export_all(model, export_dir, sample_dir):
    """Step 4: SavedModel, TFLite and ONNX exports into ``export_dir``, each verified; their reports."""
    progress = Progress(True)
    return {
        "saved_model": export_saved_model(model, os.path.join(export_dir, "saved_model"), version=1,
                                          overwrite=True, sample_dir=sample_dir, progress=progress),
        "tflite": export_tflite(model, os.path.join(export_dir, "deeplab.tflite"), overwrite=True,
                                sample_dir=sample_dir, progress=progress),
        "onnx": export_onnx(model, os.path.join(export_dir, "deeplab.onnx"), overwrite=True,
                            sample_dir=sample_dir, progress=progress),
    }


def _predict_samples(model, image_dir, out):
    """Step 5: masks and overlays in ``out/predictions``, and before/after-CRF pictures of the first 3 images."""
    images = sorted(os.path.join(image_dir, n) for n in os.listdir(image_dir))
    summary = predict_files(model, images, os.path.join(out, "predictions"), overlay_images=True, overwrite=True,
                            progress=False)
    for path in images[:3]:
        image = read_image(path)
        probs = predict_probabilities(model, image[None])
        refined = np.asarray(crf.dense_crf(probs, image[None]))
        stem = os.path.splitext(os.path.basename(path))[0]
        picture = _before_after(image, probs[0].argmax(-1), refined[0].argmax(-1))
        atomic_write_bytes(os.path.join(out, f"{stem}_before_after_crf.png"), png_bytes(picture), True)
    return {"written": len(summary["written"]), "failed": len(summary["failed"])}


def _before_after(image, before, after):
    """The image, its overlay with ``before`` and its overlay with ``after``, side by side."""
    return np.concatenate([overlay(image, before), overlay(image, after)[:, image.shape[1]:]], axis=1)


def _write_report(out, cfg, report, start):
    """Step 6: copies the training curve and writes ``out/report.json`` (with the total seconds)."""
    history_png = os.path.join(cfg.runtime.run_dir, "history.png")
    if os.path.exists(history_png):
        atomic_write_bytes(os.path.join(out, "training_curve.png"), open(history_png, "rb").read(), True)
    report["seconds"] = round(time.time() - start, 1)
    atomic_write_bytes(os.path.join(out, "report.json"), json.dumps(report, indent=1, default=str).encode(), True)
