"""Benchmark every reward: forward + backward time and peak memory per image.

CPU (default): the tiny random builds, float32, 224 px, batch 4:

    OMP_NUM_THREADS=1 python scripts/bench_rewards.py

CUDA: the full-size architectures with random weights (initialised directly on the GPU; no files, no
downloads), bfloat16, batch 8, with and without gradient checkpointing:

    python scripts/bench_rewards.py --device cuda --json bench_rewards.json

Memory: "saved" is the activation memory autograd keeps for the backward pass (bytes of the distinct
storages packed by ``saved_tensors_hooks``; the dominant term, measured the same way on every device);
on CUDA also the peak of ``torch.cuda.max_memory_allocated`` during forward + backward minus the
memory held before (weights, cached text embeddings). CPU has no allocator peak counter (glibc reuses
freed pages), hence no peak column there.
Prints a markdown table; ``--json PATH`` also writes the rows.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pgot.config import RewardConfig  # noqa: E402
from pgot.rewards import REWARDS  # noqa: E402

LEARNED = ["clip", "ict", "hp", "hps", "pickscore", "imagereward", "aesthetic"]
ANALYTIC = ["colorfulness", "contrast", "saturation", "brightness", "sharpness"]


def _saved_bytes(fn, module: torch.nn.Module) -> int:
    """Run ``fn`` and return the bytes of the distinct non-weight storages autograd saved for backward."""
    weights = {t.untyped_storage().data_ptr() for t in [*module.parameters(), *module.buffers()]}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def bench_one(
    name: str, device: str, dtype: torch.dtype, batch: int, size: int, checkpointing: bool, repeats: int
) -> dict:
    path = "" if name in ANALYTIC else ("random" if device == "cuda" else "tiny")
    cfg = RewardConfig(name=name, path=path, gradient_checkpointing=checkpointing)
    start = time.perf_counter()
    reward = REWARDS[name](cfg, device, dtype)
    build_s = time.perf_counter() - start
    weights = sum(p.numel() * p.element_size() for p in reward.parameters())
    params = sum(p.numel() for p in reward.parameters())
    prompts = [f"a photo of a cat number {i % 2}" for i in range(batch)]
    images = torch.rand(batch, 3, size, size, device=device)

    def forward() -> torch.Tensor:
        return reward(images.clone().requires_grad_(True), prompts).sum()

    forward().backward()  # warm-up: kernels, allocator, text cache
    saved = _saved_bytes(forward, reward)
    times, peaks = [], []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        forward().backward()
        if device == "cuda":
            torch.cuda.synchronize()
            peaks.append(torch.cuda.max_memory_allocated() - before)
        times.append(time.perf_counter() - t0)
    return {
        "reward": name,
        "build": path or "analytic",
        "device": device,
        "dtype": str(dtype).removeprefix("torch."),
        "batch": batch,
        "size": size,
        "checkpointing": checkpointing,
        "params_M": round(params / 1e6, 2),
        "build_s": round(build_s, 2),
        "ms_per_image": round(1e3 * statistics.median(times) / batch, 2),
        "saved_MiB_per_image": round(saved / batch / 2**20, 2),
        "peak_MiB_per_image": round(statistics.median(peaks) / batch / 2**20, 2) if peaks else None,
        "weights_MiB": round(weights / 2**20, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--batch", type=int, default=None, help="images per call (default: 4 on CPU, 8 on CUDA)")
    parser.add_argument("--size", type=int, default=224, help="image side in pixels")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rewards", nargs="*", default=None, help="names (default: all)")
    parser.add_argument("--json", default="", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device available", file=sys.stderr)
        return 2
    cuda = args.device == "cuda"
    batch = args.batch or (8 if cuda else 4)
    dtype = torch.bfloat16 if cuda else torch.float32
    names = args.rewards or (LEARNED if cuda else LEARNED + ANALYTIC)
    rows = []
    for name in names:
        for ckpt in (False, True) if cuda and name not in ANALYTIC else (False,):
            row = bench_one(name, args.device, dtype, batch, args.size, ckpt, args.repeats)
            gc.collect()  # drop the reward before building the next one
            if cuda:
                torch.cuda.empty_cache()
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    device_name = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} thread(s)"
    print(
        f"\n{device_name}, torch {torch.__version__}, batch {batch}, {args.size} px, forward + backward w.r.t. the images\n"
    )
    print(
        "| reward | build | params (M) | dtype | grad ckpt | ms / image | saved MiB / image | peak MiB / image | weights MiB |"
    )
    print("|---|---|---:|---|---|---:|---:|---:|---:|")
    for r in rows:
        peak = "n/a" if r["peak_MiB_per_image"] is None else f"{r['peak_MiB_per_image']:.2f}"
        print(
            f"| {r['reward']} | {r['build']} | {r['params_M']} | {r['dtype']} | {'yes' if r['checkpointing'] else 'no'} | {r['ms_per_image']:.2f} | {r['saved_MiB_per_image']:.2f} | {peak} | {r['weights_MiB']} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"device": device_name, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
