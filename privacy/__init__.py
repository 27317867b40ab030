"""Attacks and leakage metrics on protected images and updates; per-client reports.

`minusface` is imported first: its allocator switch must precede the first tensor."""

import minusface  # noqa: F401
