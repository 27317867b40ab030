"""Channel shuffling s(r; theta): one fresh, uniform permutation of the 192 channels per image.

Deployment draws permutations from the operating system's CSPRNG (`os.urandom`): each row of
independent random 64-bit keys is argsorted, which yields a uniform permutation (ties have
probability below 192^2 / 2^65 and are broken by position).  Permutations exist only inside
`shuffle_channels`; they are never returned, stored or logged.  A seeded `torch.Generator` can be
passed for tests and benchmarks only.
"""

from __future__ import annotations

import os

import numpy as np
import torch


def csprng_permutations(n: int, channels: int) -> torch.Tensor:
    keys = np.frombuffer(os.urandom(8 * n * channels), dtype=np.uint64).reshape(n, channels)
    return torch.from_numpy(np.argsort(keys, axis=1, kind="stable"))


def _seeded_permutations(n: int, channels: int, generator: torch.Generator) -> torch.Tensor:
    return torch.argsort(torch.rand(n, channels, generator=generator, dtype=torch.float64), dim=1)


def shuffle_channels(r: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Permute the channels of each sample of r (N, C, H, W) with its own fresh permutation.

    `generator` is for reproducible tests and benchmarks only; leave it None in deployment.
    """
    n, c = r.shape[:2]
    perm = csprng_permutations(n, c) if generator is None else _seeded_permutations(n, c, generator)
    perm = perm.to(r.device, non_blocking=True)
    if r.device.type == "cpu" and r.is_contiguous():
        # whole channel planes are contiguous: copy them as rows (index_select), 2.5-3.8x
        # faster on CPU than a gather with the index broadcast over every pixel (measured)
        rows = (perm + torch.arange(n).view(n, 1) * c).reshape(-1)
        return r.reshape(n * c, -1).index_select(0, rows).view(r.shape)
    index = perm.view(n, c, *([1] * (r.dim() - 2))).expand_as(r)
    return torch.gather(r, 1, index)
