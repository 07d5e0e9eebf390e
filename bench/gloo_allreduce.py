"""torch.distributed gloo all-reduce bandwidth, the peer of
`trainyard-trainer bench-allreduce`. Spawns `--world` processes on this host
and prints one JSON line per size from rank 0 (nccl-tests' algbw and busbw)."""

import argparse
import json
import os
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def run(rank, world, sizes, iters, warmup, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    for size in sizes:
        buf = torch.ones(size // 4, dtype=torch.float32)
        times = []
        for i in range(warmup + iters):
            dist.barrier()
            t0 = time.perf_counter()
            dist.all_reduce(buf)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
        median = statistics.median(times)
        t = torch.tensor([median])
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        median = t.item()
        algbw = size / median / 1e9
        if rank == 0:
            print(json.dumps({
                "engine": f"gloo (torch {torch.__version__})",
                "world_size": world, "bytes": size, "median_seconds": median,
                "algbw_gbps": algbw, "busbw_gbps": algbw * 2 * (world - 1) / world,
            }), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--sizes", default=str(1 << 20))
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--port", type=int, default=29650)
    a = p.parse_args()
    sizes = [int(s) for s in a.sizes.split(",")]
    mp.spawn(run, args=(a.world, sizes, a.iters, a.warmup, a.port), nprocs=a.world)
