"""The recognition service: a bundle's f_p behind an HTTP API that only ever sees X_p
(app: the ASGI app, gallery: the SQLite embedding store, auth: per-site API tokens,
run_bundle: the bundle a run leaves)."""
