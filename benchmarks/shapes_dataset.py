"""Benchmark: generation throughput of the embedded shapes dataset, and the cost of a cached load.

Prints images/s for `generate(n)` (best of `--repeats`, since the CPU may be shared), then the time of
`make_splits` writing its cache and of a second call that loads the .npz instead of regenerating.

    .venv/bin/python benchmarks/shapes_dataset.py [--n 20000] [--repeats 2] [--threads 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from dmvae_lib.data import shapes_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20_000, help="images to generate")
    parser.add_argument("--repeats", type=int, default=2, help="timed generations; the best one is reported")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (tensor conversion only)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    shapes_dataset.generate(64, seed=0)  # warm-up: imports, allocator
    times = []
    for repeat in range(args.repeats):
        start = time.perf_counter()
        shapes_dataset.generate(args.n, seed=repeat)
        times.append(time.perf_counter() - start)
        print(f"generate({args.n}): {times[-1]:.2f} s = {args.n / times[-1]:,.0f} images/s")
    print(f"best: {args.n / min(times):,.0f} images/s")

    n_val = args.n // 10
    with tempfile.TemporaryDirectory() as cache_dir:
        start = time.perf_counter()
        shapes_dataset.make_splits(args.n, n_val, seed=0, cache_dir=cache_dir)
        cold = time.perf_counter() - start
        start = time.perf_counter()
        splits = shapes_dataset.make_splits(args.n, n_val, seed=0, cache_dir=cache_dir)
        warm = time.perf_counter() - start
        size_mb = shapes_dataset.cache_path(cache_dir, args.n, n_val, 0).stat().st_size / 1e6
    print(f"make_splits({args.n}, {n_val}): generate + write cache {cold:.2f} s, cached load {warm:.2f} s "
          f"({size_mb:.0f} MB .npz; float tensors {splits.train.images.numel() * 4 / 1e6:.0f} MB train)")


if __name__ == "__main__":
    main()
