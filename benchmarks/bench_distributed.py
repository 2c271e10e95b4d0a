"""Data-parallel scaling on this machine: the same training on 1 and on 2 processes (gloo).

    python benchmarks/bench_distributed.py [--quick]

Scaling efficiency = samples/s with 2 processes / (2 x samples/s with 1), one thread each.
"""

import argparse
import os
import platform

import torch

from batchfit.bench.common import format_table
from batchfit.bench.distributed import distributed_rows

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("--quick", action="store_true")
args = parser.parse_args()
rows = distributed_rows(quick=args.quick)
print(f"batchfit distributed bench ({'quick' if args.quick else 'full'}; {platform.machine()}, {os.cpu_count()} cores, "
      f"torch {torch.__version__}); medians of alternating runs")
print(format_table(rows))
row = rows[0]
print(f"1 process: {row.baseline_rate / 2:,.0f} samples/s; 2 processes: {row.rate:,.0f} samples/s; "
      f"scaling efficiency: {row.ratio:.2f}")
