"""The machine's fp32 matmul throughput in GFLOP/s, the figure bench/README.md gives for its machine.

    python bench/matmul_gflops.py              # torch's default threads, 2048 x 2048 matrices
    python bench/matmul_gflops.py --threads 1 --size 1024

The best of --repeat timed rounds (a round multiplies until --seconds have passed), after one warm-up product;
2 * size^3 floating-point operations per product."""

import argparse
import time

import torch


def gflops(size, threads, seconds, repeat):
    if threads:
        torch.set_num_threads(threads)
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)  # warm-up: the first product pays for allocation and thread start
    best = 0.0
    for _ in range(repeat):
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            torch.mm(a, b)
            n += 1
        best = max(best, 2 * size**3 * n / (time.perf_counter() - start) / 1e9)
    return best


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=2048)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--seconds", type=float, default=2.0)
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args()
    result = gflops(args.size, args.threads, args.seconds, args.repeat)
    print(f"fp32 matmul {args.size}x{args.size}, {torch.get_num_threads()} threads, torch {torch.__version__}: "
          f"{result:.1f} GFLOP/s (best of {args.repeat})")
