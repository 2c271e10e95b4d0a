"""Shard benchmarks: peak RSS from a big dataset, warm/cold throughput, shuffle quality.

    python benchmarks/bench_shards.py [--size-gb 4] [--quick] [--dir /tmp]
"""

from batchfit.bench.shards import main

main()
