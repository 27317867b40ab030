"""Entry points: the `minusfed` command line and the demo; they sit above everything they call.

`minusface` is imported first: its allocator switch must precede the first tensor."""

import minusface  # noqa: F401
