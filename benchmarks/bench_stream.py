"""Training from a Redis stream: events/s and XADD -> snapshot latency on MovieLens-100k (starts its own redis-server).

    python benchmarks/bench_stream.py [--events N] [--rate EVENTS_PER_S] [--json out.json]
"""

import argparse
import json

from batchfit.bench.stream import format_stream_table, stream_table

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("--events", type=int, default=20000)
parser.add_argument("--rate", type=float, default=5000.0)
parser.add_argument("--json")
args = parser.parse_args()
rows = stream_table(events=args.events, rate=args.rate)
print(format_stream_table(rows))
if args.json:
    with open(args.json, "w") as handle:
        json.dump(rows, handle, indent=2)
