"""Longer fuzz run of the weight-file readers: mutate the seed files of ``tests/readers_fuzz.py`` (small
caffemodels in every blob style, the torch-written ``.pth`` fixtures) for a while and count the cases that
survived (parsed, or refused with the reader's own one-line error, within the time and memory bound).

    python benchmarks/fuzz_readers.py --minutes 5 [--seed 1] [--failures /tmp/fuzz-failures]

Prints the cases run per seed file and kind of mutation, the parsed / refused split, and writes every failing
input to ``--failures`` (the run goes on; exit 1 when any failed).
"""
import argparse
import collections
import os
import pathlib
import random
import sys
import tempfile
import time
import traceback

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from tests import readers_fuzz as rf  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--failures", default=os.path.join(tempfile.gettempdir(), "fuzz-failures"))
    args = parser.parse_args(argv)
    seeds, rng = rf.seed_files(), random.Random(args.seed)
    results, failures = collections.Counter(), 0
    stop = time.monotonic() + args.minutes * 60
    with tempfile.TemporaryDirectory() as tmp:
        while time.monotonic() < stop:
            name = rng.choice(sorted(seeds))
            fmt = "pth" if name.endswith(".pth") else "caffemodel"
            kind = rng.choice(rf.KINDS if fmt == "pth" else rf.KINDS[:-1])
            data = rf.mutate(seeds[name], fmt, rng, kind)
            path = os.path.join(tmp, f"case.{fmt}")
            with open(path, "wb") as f:
                f.write(data)
            try:
                results[rf.run_case(path, fmt)] += 1
                results[(name, kind)] += 1
            except BaseException as e:  # noqa: BLE001 (a failing case is recorded, the run goes on)
                if isinstance(e, KeyboardInterrupt):
                    raise
                failures += 1
                os.makedirs(args.failures, exist_ok=True)
                out = os.path.join(args.failures, f"{failures:04d}-{name}-{kind}.{fmt}")
                with open(out, "wb") as f:
                    f.write(data)
                print(f"FAILED {out}: {type(e).__name__}: {str(e)[:200]}", file=sys.stderr)
                traceback.print_exc(limit=3)
    survived = results["parsed"] + results["refused"]
    for (name, kind), n in sorted((k, v) for k, v in results.items() if isinstance(k, tuple)):
        print(f"{name:22s} {kind:9s} {n:7,d}")
    print(f"{survived:,} of {survived + failures:,} cases survived in {args.minutes:g} min "
          f"({results['parsed']:,} parsed, {results['refused']:,} refused with the reader's error, "
          f"{failures} failed)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
