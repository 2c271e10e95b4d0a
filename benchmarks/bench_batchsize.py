"""auto / adaptive batch sizes against a sweep of fixed ones: time and steps to a target metric.

    python benchmarks/bench_batchsize.py [--quick] [--repeats N] [--json out.json]
"""

import argparse
import json

from batchfit.bench.batchsize import batch_size_table, format_batch_size_table

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("--quick", action="store_true")
parser.add_argument("--repeats", type=int, default=1)
parser.add_argument("--json")
args = parser.parse_args()
rows = batch_size_table(quick=args.quick, repeats=args.repeats)
print(format_batch_size_table(rows))
if args.json:
    with open(args.json, "w") as handle:
        json.dump(rows, handle, indent=2, default=str)
