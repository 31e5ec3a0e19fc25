"""Property-based fuzzing of the weight-file readers (issue #22): valid files (tests/readers_fuzz.py's seeds:
small caffemodels in every blob style, the torch-written .pth fixtures) mutated by bit flips, truncation,
inserted varints, changed lengths, repeated slices and pickle opcode swaps are parsed, or refused with the
reader's own one-line error naming the file, within readers_fuzz.SECONDS and MEGABYTES. The longer run is
benchmarks/fuzz_readers.py."""
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests import readers_fuzz as rf

SEEDS = rf.seed_files()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


@settings(max_examples=1000, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(sorted(SEEDS)), kinds=st.lists(st.sampled_from(rf.KINDS), min_size=1, max_size=3),
       seed=st.integers(0, 2 ** 32 - 1))
def test_mutated_files_parse_or_are_refused_within_bounds(folder, name, kinds, seed):
    fmt = "pth" if name.endswith(".pth") else "caffemodel"
    rng, data = random.Random(seed), SEEDS[name]
    for kind in kinds:
        if data:
            data = rf.mutate(data, fmt, rng, kind if fmt == "pth" or kind != "pickle" else "flip")
    path = folder / f"case.{fmt}"
    path.write_bytes(data)
    assert rf.run_case(path, fmt) in ("parsed", "refused")


@pytest.mark.parametrize("name", sorted(SEEDS))
def test_seed_files_parse(folder, name):
    """The unmutated seeds parse (so the mutations start from valid files)."""
    from deeplab_keras.weights.caffe import read_caffemodel
    from deeplab_keras.weights.pth import read_pth

    fmt = "pth" if name.endswith(".pth") else "caffemodel"
    path = folder / f"seed.{fmt}"
    path.write_bytes(SEEDS[name])
    with rf.bounded():
        assert len(read_pth(path) if fmt == "pth" else list(read_caffemodel(path))) >= 2
