"""Benchmarks of the product's own code paths; run each as `python -m bench.NAME` from the
repository root.  Shared pieces (paths, data default, provenance, timers, memory, tables) are in
`bench.common`."""
