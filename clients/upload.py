"""What a site ships in pooled stage 2: one chunk of its training faces, protected.

Chunk `c` covers the site's training faces `[c * K, (c + 1) * K)` in its fixed order (K =
chunk-images); each face is protected `copies` times with the frozen global g, every copy with
a fresh CSPRNG permutation (`MinusFaceFrontend.protect`, which registers its outputs for the
outbound guard), and shipped as float16 with its identity's pseudonymous token.  Asking for a
chunk again protects it again (new permutations): the server keeps one answer per chunk, so a
re-sent chunk replaces nothing and adds nothing.  Raw faces and residues never leave this
function; only X_p does.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch

from minusface.frontend import MinusFaceFrontend
from minusface.images import to_signed
from minusface.losses import freeze
from task.models import generator_from_arrays

from .pseudonyms import SitePseudonyms
from .site import SiteData

MAX_COPIES = 16


def chunk_count(num_images: int, chunk_images: int) -> int:
    return math.ceil(num_images / chunk_images)


def upload_chunk(site: SiteData, generator: Mapping[str, torch.Tensor], names: SitePseudonyms,
                 chunk: int, chunk_images: int, copies: int
                 ) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """(X_p float16 (n, 3, 112, 112), label tokens int64 (n,), the "upload" metrics) for one
    chunk, n = faces in the chunk x copies (face-major: a face's copies are adjacent)."""
    if not 1 <= copies <= MAX_COPIES:
        raise ValueError(f"copies must be in 1..{MAX_COPIES}, got {copies}")
    if chunk_images < 1:
        raise ValueError(f"chunk-images must be >= 1, got {chunk_images}")
    total = site.train.num_images
    chunks = chunk_count(total, chunk_images)
    if not 0 <= chunk < chunks:
        raise ValueError(f"chunk {chunk} out of range: this site has {chunks} chunk(s)")
    rows = np.arange(chunk * chunk_images, min(total, (chunk + 1) * chunk_images))
    faces = to_signed(site.train.images[rows])
    frontend = MinusFaceFrontend(generator=freeze(generator_from_arrays(generator)))
    xp = torch.stack([frontend.protect(faces) for _ in range(copies)], dim=1)   # (m, copies, ...)
    xp16 = xp.reshape(-1, *xp.shape[2:]).numpy().astype(np.float16)
    labels = np.repeat(names.labels[np.asarray(site.train.labels)[rows]], copies)
    metrics = {"chunk": int(chunk), "chunks": int(chunks), "images": int(len(rows)),
               "copies": int(copies), "identities": int(len(names.labels)),
               "site-token": int(names.site_token)}
    return xp16, labels.astype(np.int64), metrics
