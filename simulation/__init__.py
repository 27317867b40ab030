"""Partitioning faces across virtual clients, simulation presets and launch helpers.

`minusface` is imported first: its allocator switch must precede the first tensor."""

import minusface  # noqa: F401
