"""The ridge head's Gram sums per batch: `python benchmarks/ridge_sums.py [--batch 512 --projection 2048]`.

`RidgeStatistics.accumulate`'s product phi^T phi of one batch, on one thread as a Train worker
with one CPU runs it: torch's full float64 product against `add_gram` (BLAS syrk, the lower
triangle only), alternated, 7 repeats of 5 batches; prints the median milliseconds of each and
the ratio, and that the two agree.
"""
import argparse
import time

import numpy as np
import torch

from models.methods.analytic import add_gram, symmetric_from_lower


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--projection", type=int, default=2048)
    args = parser.parse_args()
    torch.set_num_threads(1)
    phi = torch.randn(args.batch, args.projection, generator=torch.Generator().manual_seed(0)).relu().double()
    full, lower = (torch.zeros(args.projection, args.projection, dtype=torch.float64) for _ in range(2))
    ways = {"torch float64 product": lambda: full.add_(phi.T @ phi), "add_gram (syrk)": lambda: add_gram(lower, phi)}
    seconds = {k: [] for k in ways}
    for _ in range(7):
        for name, step in ways.items():
            start = time.perf_counter()
            for _ in range(5):
                step()
            seconds[name].append((time.perf_counter() - start) / 5)
    medians = {k: float(np.median(v)) for k, v in seconds.items()}
    for name, s in medians.items():
        print(f"{name}: {1e3 * s:.1f} ms per batch of {args.batch} x {args.projection}")
    print(f"ratio: {medians['torch float64 product'] / medians['add_gram (syrk)']:.2f}x; agree: "
          f"{torch.allclose(symmetric_from_lower(lower), full, rtol=1e-12, atol=1e-9)}")


if __name__ == "__main__":
    main()
