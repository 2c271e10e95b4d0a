"""Training from a Redis stream, measured on MovieLens-100k (starts its own redis-server; one torch thread):

1. events/s through the trainer (producer -> Redis -> batch -> update) at batch 32 and 256, without
   checkpoints and with a checkpoint + XACK every 10 steps and every step, and what one checkpoint + ack costs;
2. p50/p99 latency from an event's XADD to the first published snapshot that includes it, at two batch
   sizes and two max_latency values, the producer writing at --rate events/s;
3. the recipe's prequential RMSE over time against a model trained offline on the same events (and the
   OFFLINE.md figures), with a plot.

    python benchmarks/bench_stream.py [--events N] [--rate EVENTS_PER_S] [--repeats R] [--json out.json]
                                      [--plot recipe.png] [--skip-recipe]
"""

import argparse
import json

from batchfit.bench.stream import checkpoint_costs, format_stream_table, stream_table
from batchfit.bench.stream_recipe import format_recipe_table, recipe_table

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--events", type=int, default=10000)
parser.add_argument("--rate", type=float, default=5000.0)
parser.add_argument("--repeats", type=int, default=3)
parser.add_argument("--json")
parser.add_argument("--plot", help="PNG of the prequential RMSE per window against the offline model")
parser.add_argument("--skip-recipe", action="store_true")
args = parser.parse_args()
results = {}
if not args.skip_recipe:
    results["recipe"] = recipe_table(plot=args.plot)
    print(format_recipe_table(results["recipe"]), "\n", flush=True)
rows = stream_table(events=args.events, rate=args.rate, repeats=args.repeats)
results["stream"] = rows
results["checkpoint_costs"] = checkpoint_costs(rows)
print(format_stream_table(rows))
if args.json:
    with open(args.json, "w") as handle:
        json.dump(results, handle, indent=2)
