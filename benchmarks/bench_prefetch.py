"""Prefetching: prefetch=2 against prefetch=0 from memory, warm shards, a costly transform and
cold shards, and what a thread's hand-over of a batch costs.

    python benchmarks/bench_prefetch.py [--quick] [--repeats N]
"""

import argparse

from batchfit.bench.common import format_table
from batchfit.bench.prefetch import prefetch_rows

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("--quick", action="store_true")
parser.add_argument("--repeats", type=int, default=None)
args = parser.parse_args()
print(format_table(prefetch_rows(quick=args.quick, repeats=args.repeats)))
