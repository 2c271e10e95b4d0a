"""Image benchmarks: images/s of encoded shards decoded in workers against a torchvision-style
per-sample pipeline at 1 and 2 workers, disk size encoded vs decoded, peak RSS of a training epoch.

    python benchmarks/bench_images.py [--images 600] [--size 112] [--repeats 5] [--rss-mb 1024] [--quick]
"""

from batchfit.bench.images import main

main()
