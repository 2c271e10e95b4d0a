"""Language-model fine-tuning: padding and tokens/s by batching mode, batchfit against
transformers.Trainer (group_by_length, gradient accumulation), peak memory with and without
gradient checkpointing and LoRA. One torch thread; real fine-food reviews; see batchfit/bench/text.py.

    python benchmarks/bench_text.py [--quick] [--repeats N] [--no-memory] [--json out.json]
"""

import argparse
import json

from batchfit.bench.text import format_text_bench, text_bench

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("--quick", action="store_true", help="fewer samples, one repeat (about 4 minutes on 2 cores)")
parser.add_argument("--repeats", type=int, help="runs of each batching mode (default 3, --quick 1)")
parser.add_argument("--no-memory", action="store_true", help="leave out the SmolLM2 memory rows")
parser.add_argument("--json")
args = parser.parse_args()
result = text_bench(quick=args.quick, repeats=args.repeats, memory=not args.no_memory)
print(format_text_bench(result))
if args.json:
    with open(args.json, "w") as handle:
        json.dump(result, handle, indent=2)
