"""benchmarks/network.py in its tiny configuration: every inference and training path in the table, finite
numbers, the same labels from every runtime. No timing assertions (speed is measured by the benchmark itself)."""
import json
import math
import subprocess
import sys

import pytest

from tests.conftest import REPO

BENCH = REPO / "benchmarks"


@pytest.mark.slow
def test_network_benchmark_tiny(tmp_path):
    out = tmp_path / "network.json"
    proc = subprocess.run([sys.executable, str(BENCH / "network.py"), "--tiny", "--workdir", str(tmp_path / "work"),
                           "--json", str(out)], capture_output=True, text=True, timeout=900, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    inference = {r["path"]: r for r in result["inference"]}
    assert set(inference) == {"tf", "tf_xla", "saved_model", "litert", "onnxruntime"}
    train = {r["path"] for r in result["train"]}
    assert train == {f"train{jit} b2 msc {msc}" for jit in ("", "_xla") for msc in ("off", "on")}
    for row in result["inference"] + result["train"]:
        for key in ("median_s", "min_s", "cpu_s", "gflop", "gflop_per_s", "x_matmul", "peak_rss_mb"):
            assert math.isfinite(row[key]) and row[key] > 0, (key, row)
        assert row["path"] in proc.stdout
    for row in result["inference"]:
        assert "labels_vs_first=1.0" in row["notes"], row  # every runtime gives the TF labels
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
