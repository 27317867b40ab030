"""Split face IDENTITIES across virtual clients (each identity on exactly one client).

Face recognition federations are identity-disjoint: a person's images live at one site, so the
partitioners here deal whole identities, never single images.  Everything is pure numpy/python and
deterministic for a seed: identities are first sorted by name, so the result does not depend on the
order of the input mapping, and all randomness comes from one `numpy.random.Generator(seed)`.

Schemes (`partition_identities(..., scheme=...)`):

* ``uniform``: seeded shuffle, then a stable sort by image count (largest first, ties keep the
  shuffled order), then a snake deal (0..K-1, K-1..0, ...).  Identity counts per client differ by at
  most one and the snake order keeps image counts roughly balanced.
* ``dirichlet``: client shares ``p ~ Dirichlet(alpha)``; each identity goes to a client drawn with
  probabilities ``p``.  Small ``alpha`` -> strongly skewed clients.  Clients below
  ``min_identities`` are topped up with random identities taken from the currently largest client.
* ``big-small``: ``num_big`` big sites (clients ``0..num_big-1``) together hold ``big_share`` of the
  identities; the rest are spread uniformly over the small sites.  Within each group identities
  are dealt as in ``uniform``.
"""

from __future__ import annotations

import numbers
import statistics
from collections.abc import Callable, Mapping, Sequence

import numpy as np

Counts = Mapping[str, "int | Sequence"]
Partition = list[list[str]]


def _as_counts(counts: Counts) -> dict[str, int]:
    """Normalise identity -> int count | list of paths to identity -> int, sorted by name."""
    out: dict[str, int] = {}
    for name in sorted(counts):
        value = counts[name]
        if isinstance(value, (str, bytes)):
            raise TypeError(f"identity {name!r}: expected an image count or a list of paths, "
                            f"got a single string")
        n = int(value) if isinstance(value, numbers.Integral) else len(value)
        if n < 0:
            raise ValueError(f"identity {name!r} has a negative image count ({n})")
        out[name] = n
    return out


def _snake_deal(names: list[str], counts: dict[str, int], num_clients: int,
                rng: np.random.Generator) -> Partition:
    """Shuffle, stable-sort by count descending, deal in snake order: equal identity numbers per
    client (+-1) and roughly equal image numbers."""
    order = [names[i] for i in rng.permutation(len(names))]
    order.sort(key=lambda n: -counts[n])  # stable: ties keep the seeded shuffle order
    parts: Partition = [[] for _ in range(num_clients)]
    for i, name in enumerate(order):
        rnd, pos = divmod(i, num_clients)
        parts[pos if rnd % 2 == 0 else num_clients - 1 - pos].append(name)
    return parts


def _uniform(names: list[str], counts: dict[str, int], num_clients: int,
             rng: np.random.Generator) -> Partition:
    return _snake_deal(names, counts, num_clients, rng)


def _dirichlet(names: list[str], counts: dict[str, int], num_clients: int,
               rng: np.random.Generator, alpha: float = 0.5,
               min_identities: int = 2) -> Partition:
    if not alpha > 0:
        raise ValueError(f"dirichlet: alpha must be > 0, got {alpha}")
    if min_identities < 0:
        raise ValueError(f"dirichlet: min_identities must be >= 0, got {min_identities}")
    need = num_clients * min_identities
    if len(names) < need:
        raise ValueError(f"dirichlet: {len(names)} identities cannot give {num_clients} clients "
                         f"at least {min_identities} each (needs {need})")
    shares = rng.dirichlet(np.full(num_clients, float(alpha)))
    owners = rng.choice(num_clients, size=len(names), p=shares)
    parts: Partition = [[] for _ in range(num_clients)]
    for name, owner in zip(names, owners):
        parts[int(owner)].append(name)
    # Top up starved clients from the largest one (largest always has > min_identities here).
    while True:
        sizes = [len(p) for p in parts]
        small = min(range(num_clients), key=lambda c: sizes[c])
        if sizes[small] >= min_identities:
            break
        big = max(range(num_clients), key=lambda c: sizes[c])
        parts[small].append(parts[big].pop(int(rng.integers(sizes[big]))))
    return parts


def _big_small(names: list[str], counts: dict[str, int], num_clients: int,
               rng: np.random.Generator, num_big: int = 2,
               big_share: float = 0.6) -> Partition:
    num_small = num_clients - num_big
    if not 1 <= num_big < num_clients:
        raise ValueError(f"big-small: need 1 <= num_big < num_clients, got num_big={num_big}, "
                         f"num_clients={num_clients}")
    if not 0.0 < big_share < 1.0:
        raise ValueError(f"big-small: big_share must be in (0, 1), got {big_share}")
    n_big = int(round(big_share * len(names)))
    if n_big < num_big or len(names) - n_big < num_small:
        raise ValueError(f"big-small: {len(names)} identities with big_share={big_share} give "
                         f"{n_big} to {num_big} big and {len(names) - n_big} to {num_small} "
                         f"small sites; every site needs at least one")
    shuffled = [names[i] for i in rng.permutation(len(names))]
    big = _snake_deal(shuffled[:n_big], counts, num_big, rng)
    small = _snake_deal(shuffled[n_big:], counts, num_small, rng)
    return big + small


SCHEMES: dict[str, Callable[..., Partition]] = {
    "uniform": _uniform,
    "dirichlet": _dirichlet,
    "big-small": _big_small,
}


def partition_identities(counts: Counts, num_clients: int, scheme: str = "uniform",
                         seed: int = 0, **kw) -> Partition:
    """Split the identities of `counts` (identity -> image count or list of paths) over
    `num_clients` clients; returns one list of identity names per client.  Scheme options go in
    `kw` (dirichlet: alpha, min_identities; big-small: num_big, big_share)."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown partition scheme {scheme!r}; valid: {', '.join(SCHEMES)}")
    norm = _as_counts(counts)
    n_ids = len(norm)
    if not 1 <= num_clients <= n_ids:
        raise ValueError(f"num_clients={num_clients} must be between 1 and the number of "
                         f"identities ({n_ids})")
    rng = np.random.default_rng(seed)
    parts = SCHEMES[scheme](list(norm), norm, num_clients, rng, **kw)
    return [sorted(p) for p in parts]


def partition_for_client(counts: Counts, num_clients: int, client_id: int,
                         scheme: str = "uniform", seed: int = 0, **kw) -> list[str]:
    """Identities of one client: recomputes the whole (deterministic) partition, so every
    ClientApp that calls this with the same arguments agrees on the split without coordination."""
    if not 0 <= client_id < num_clients:
        raise ValueError(f"client_id={client_id} out of range for num_clients={num_clients}")
    return partition_identities(counts, num_clients, scheme, seed, **kw)[client_id]


def summarize(partition: Partition, counts: Counts) -> list[dict]:
    """One row per client: {'client', 'identities', 'images'}."""
    norm = _as_counts(counts)
    return [{"client": c, "identities": len(ids), "images": sum(norm[i] for i in ids)}
            for c, ids in enumerate(partition)]


def format_summary(rows: list[dict]) -> str:
    """Printable table of `summarize` rows with totals and min/median/max images per client."""
    lines = [f"{'client':>6} {'identities':>10} {'images':>8}"]
    lines += [f"{r['client']:>6} {r['identities']:>10} {r['images']:>8}" for r in rows]
    images = [r["images"] for r in rows]
    lines.append(f"{'total':>6} {sum(r['identities'] for r in rows):>10} {sum(images):>8}")
    if images:
        lines.append(f"images per client: min {min(images)}  "
                     f"median {statistics.median(images):g}  max {max(images)}")
    return "\n".join(lines)
