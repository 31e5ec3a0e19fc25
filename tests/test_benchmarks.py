"""benchmarks/network.py in its tiny configuration: every inference and training path in the table, finite
numbers, the same labels from every runtime; the PyTorch peer is the same network as the Keras model (skipped
without torch, an optional benchmark requirement). No timing assertions (speed is measured by the benchmarks)."""
import importlib.util
import json
import math
import subprocess
import sys

import numpy as np
import pytest

from deeplab_keras.precision import bf16_supported
from tests.conftest import REPO, TINY

BENCH = REPO / "benchmarks"
HAS_TORCH = importlib.util.find_spec("torch") is not None


@pytest.mark.slow
def test_network_benchmark_tiny(tmp_path):
    out = tmp_path / "network.json"
    proc = subprocess.run([sys.executable, str(BENCH / "network.py"), "--tiny", "--workdir", str(tmp_path / "work"),
                           "--json", str(out), "--msc", "off"],  # MSC training: tests/test_train_recipe.py
                          capture_output=True, text=True, timeout=900, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    inference = {r["path"]: r for r in result["inference"]}
    bf16, torch = bf16_supported(), HAS_TORCH
    assert set(inference) == {"tf", "tf_plain", "tf_xla", "saved_model", "litert", "onnxruntime"} | (
        {"tf_bf16", "tf_bf16_plain"} if bf16 else set()) | ({"torch", "torch_bf16"} if torch else set())
    train = {r["path"] for r in result["train"]}
    assert train == {f"train{jit} b2 msc off" for jit in ("", "_xla")} | (
        {"train_bf16 b2 msc off"} if bf16 else set()) | ({"torch_train b2 msc off"} if torch else set())
    if not torch:
        assert "torch is not installed" in proc.stdout
    for row in result["inference"] + result["train"]:
        for key in ("median_s", "min_s", "cpu_s", "gflop", "gflop_per_s", "x_matmul", "peak_rss_mb"):
            assert math.isfinite(row[key]) and row[key] > 0, (key, row)
        assert row["path"] in proc.stdout
    for row in result["inference"]:
        if "bf16" not in row["path"]:  # every float32 runtime gives the TF labels; bfloat16 nearly
            assert "labels_vs_first=1.0" in row["notes"], row
        assert ("x_torch=" in row["notes"]) == torch, row
    assert "size_vs_weights=" in inference["saved_model"]["notes"]
    assert all(v > 0 for v in result["matmul_gflop_per_s"].values())


def test_flop_count_matches_the_paper_network():
    """ResNet-101 ASPP-L at 513x513: ~378 GFLOP (convolutions); MSC adds the 385 and 257 px networks."""
    sys.path.insert(0, str(BENCH))
    try:
        from flops import forward_flops, network_flops
    finally:
        sys.path.remove(str(BENCH))
    import deeplab_keras as dk

    model = dk.DeepLabV2(21, "resnet101", msc_scales=(1.0, 0.75, 0.5))
    single = network_flops(model.network, 513, 513)
    assert abs(single / 1e9 - 377.8) < 0.1
    assert forward_flops(model, 513, 513) == single + network_flops(model.network, 385, 385) + \
        network_flops(model.network, 257, 257)
    # the head alone: 4 branches of 3x3x2048x21 on the 65x65 map
    one_branch = forward_flops(dk.DeepLabV2(21, "resnet101", aspp=(6,)), 513, 513)
    assert single - one_branch == 3 * 2 * 65 * 65 * 9 * 2048 * 21


@pytest.mark.skipif(not HAS_TORCH, reason="torch is an optional benchmark requirement (benchmarks/requirements.txt)")
def test_torch_peer_is_the_same_network(size=68):
    """The Keras model's weights copied into the PyTorch DeepLab v2 by name give the same logits (Caffe's ceil
    pooling and the dilations included: at 68 px floor pooling would give another grid), and the
    torch training step lowers the loss on a repeated batch."""
    import torch

    sys.path.insert(0, str(BENCH))
    try:
        from network import torch_peer
        from torch_deeplab import fused_for_inference, train_step_fn
    finally:
        sys.path.remove(str(BENCH))
    import keras

    import deeplab_keras as dk

    keras.utils.set_random_seed(size)
    kwargs = dict(TINY["resnet101"], num_classes=4)
    model = dk.DeepLabV2(**kwargs)
    rng = np.random.default_rng(size)
    for w in model.weights:  # non-trivial batch norm statistics
        if "moving" in w.path:
            w.assign(rng.uniform(0.5, 1.5, w.shape).astype("float32"))
    net = torch_peer(kwargs, model).eval()
    images = rng.uniform(0, 255, (2, size, size + 3, 3)).astype(np.float32)
    want = np.asarray(model(images))
    with torch.no_grad():
        got = net(torch.from_numpy(images).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
        fused = fused_for_inference(net)(torch.from_numpy(images).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-4 * np.abs(want).max())
    np.testing.assert_allclose(fused, want, atol=1e-4 * np.abs(want).max())  # batch norm folded: the same logits
    step = train_step_fn(torch_peer(kwargs, model), lr=1e-5)
    labels = rng.integers(0, 4, images.shape[:3]).astype(np.uint8)
    losses = [step(images, labels) for _ in range(3)]
    assert losses[-1] < losses[0], losses
