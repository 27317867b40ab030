"""What runs at a site: data, local training, the Flower ClientApp, the outbound guard.

`minusface` is imported first: its allocator switch must precede the first tensor."""

import minusface  # noqa: F401
