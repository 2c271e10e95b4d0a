"""A full shuffle of shards 8x larger than the mapping limit against a block shuffle: reads with
a warm and a cold page cache, training with prefetch, peak RSS.

    python benchmarks/bench_shuffle.py [--quick] [--limit-mib 64] [--dir /tmp]
"""

from batchfit.bench.shuffle import main

main()
