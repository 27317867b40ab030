"""What the site and the server share, Flower-free: run config, record names, wire format,
initial models and the learning-rate plan (Flower's examples call this module `task`).

`minusface` is imported first: its allocator switch must precede the first tensor."""

import minusface  # noqa: F401
