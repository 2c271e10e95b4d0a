"""What the seed workloads need beyond the core: data, models and recipes (streams: :mod:`.stream`)."""
