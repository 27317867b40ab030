"""Deployment helpers for a real (non-simulated) Flower federation: TLS and SuperNode keys."""
