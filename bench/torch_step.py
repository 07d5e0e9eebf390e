"""PyTorch side of bench/segnet_cpu.sh and bench/gpu-check.sh: training-step
throughput of the reference SegNet (forward, backward, AdamW step) on a fixed
random batch, on the CPU or a CUDA GPU (eager mode, synchronised before each
clock read). Prints one JSON line shaped like `trainyard-trainer bench-step`."""

import argparse
import json
import os
import resource
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torch_segnet import SegNet  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--decoder", default="unpool", choices=["unpool", "nearest"])
p.add_argument("--batch", type=int, default=16)
p.add_argument("--size", type=int, default=64)
p.add_argument("--classes", type=int, default=4)
p.add_argument("--steps", type=int, default=20)
p.add_argument("--warmup", type=int, default=3)
p.add_argument("--threads", type=int, default=2)
p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
a = p.parse_args()

torch.set_num_threads(a.threads)
torch.manual_seed(0)
dev = torch.device(a.device)
net = SegNet(widths=(16, 32, 64), convs_per_stage=2, classes=a.classes, decoder=a.decoder).train().to(dev)
opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-4)
x = torch.rand(a.batch, 3, a.size, a.size, device=dev)
y = torch.randint(0, a.classes, (a.batch, a.size, a.size), device=dev)


def sync():
    if dev.type == "cuda":
        torch.cuda.synchronize()


times = []
for i in range(a.warmup + a.steps):
    sync()
    t0 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    loss = F.cross_entropy(net(x), y, ignore_index=255)
    loss.backward()
    opt.step()
    sync()
    if i >= a.warmup:
        times.append(time.perf_counter() - t0)
median = statistics.median(times)
print(json.dumps({
    "engine": f"pytorch {torch.__version__} {a.device}",
    "decoder": a.decoder,
    "batch_size": a.batch,
    "steps": a.steps,
    "median_step_seconds": median,
    "images_per_sec": a.batch / median,
    "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    "threads": torch.get_num_threads(),
}))
