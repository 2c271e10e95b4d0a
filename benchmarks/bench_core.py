"""The in-memory data path and the training-step overhead (DESIGN.md performance table).

    python benchmarks/bench_core.py [--quick]

Ratios are against baselines run side by side in the same process (interleaved repeats).
"""

import argparse

from batchfit.bench.run import run_bench

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("--quick", action="store_true")
args = parser.parse_args()
print(run_bench(quick=args.quick, only="data"))
print(run_bench(quick=args.quick, only="train"))
