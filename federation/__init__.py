"""Flower wiring: ServerApp, message schemas, deployment (certs, keys, launch).

`minusface` is imported first: its allocator switch must precede the first tensor."""

import minusface  # noqa: F401
