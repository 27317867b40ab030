"""MinusFace in pure PyTorch (no Flower): DCT maps, generator, shuffle, recognizers, protect()."""

from .runtime import request_huge_pages

# PyTorch reads its huge-page switch at the process's first CPU tensor: set it before any of our
# modules makes one (minusface/runtime.py).
request_huge_pages()
