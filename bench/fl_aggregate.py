"""Times Flower's server-side aggregation on random updates, the same shapes
trainyard-trainer bench-aggregate uses: one JSON line per setting.

Usage: fl_aggregate.py CLIENTS PARAMS RULE ITERS   (RULE: mean | median)
"""
import json
import sys
import time

import numpy as np
from flwr.server.strategy.aggregate import aggregate, aggregate_median

clients, params, rule, iters = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
rng = np.random.default_rng(1)
results = [([rng.uniform(-1, 1, params).astype(np.float32)], 10 + i) for i in range(clients)]
fn = {"mean": aggregate, "median": aggregate_median}[rule]
times = []
for _ in range(iters):
    t = time.perf_counter()
    out = fn(results)
    times.append(time.perf_counter() - t)
times.sort()
median = times[len(times) // 2]
print(json.dumps({
    "peer": "flwr", "version": __import__("flwr").__version__, "rule": rule,
    "clients": clients, "params": params, "iters": iters, "median_seconds": median,
    "read_gbps": clients * params * 4 / median / 1e9,
}))
