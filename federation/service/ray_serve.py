"""`minusfed serve --replicas N`: the same recognition app as a Ray Serve deployment.

Each replica builds the app from the bundle, the tokens file and the gallery file itself (the
builder below runs in the replica, so no model or token crosses Ray's object store); Ray Serve's
HTTP proxy terminates TLS with the same certificate and spreads requests over the replicas.
Replicas share one SQLite gallery file and catch up with each other's commits before every
request (federation/service/gallery.py), which holds on one machine; replicas on several
machines would need a gallery on a shared database server, which is not built.

With `RAY_ADDRESS` set (or --ray-address), the deployment joins that Ray cluster; otherwise a
local Ray instance is started and stopped with the process.  Access logs are off in Ray Serve
as in uvicorn: a request path holds a subject id.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import warnings
from collections.abc import Callable

APP_NAME, DEPLOYMENT = "minusfed", "recognition"


def app_builder(settings: dict) -> Callable[[], object]:
    """A no-argument function that builds the FastAPI app inside a replica (Ray Serve calls it
    there); `settings` holds paths and plain values only."""

    def build_app():
        import torch

        from federation.service import torch_thread
        from federation.service.app import ServiceSettings, create_app
        from federation.service.auth import TokenCheck, read_tokens
        from federation.service.gallery import Gallery
        from federation.service.model import served_model

        if settings["threads"]:
            torch.set_num_threads(settings["threads"])
        served = torch_thread.call(served_model, settings["bundle"], settings["precision"])
        tokens = TokenCheck(read_tokens(settings["tokens"])) if settings["tokens"] else None
        gallery = torch_thread.call(Gallery, settings["gallery"], served.bundle.embedding_size,
                                    served.tag)
        return create_app(served, gallery, tokens,
                          ServiceSettings(far=settings["far"],
                                          max_body_bytes=settings["max_body_bytes"],
                                          cpu_compile=settings["cpu_compile"]))

    return build_app


def run_ray_serve(args: argparse.Namespace, banner: Callable[[], None]) -> int:
    """Deploy, announce (`banner`), serve until SIGTERM or SIGINT, then shut down Serve and Ray."""
    import logging

    import ray
    from ray import serve
    from ray.serve.config import HTTPOptions
    from ray.serve.schema import LoggingConfig

    settings = {"bundle": os.path.abspath(args.bundle), "gallery": os.path.abspath(args.gallery),
                "tokens": os.path.abspath(args.tokens) if args.tokens else None,
                "far": args.far, "max_body_bytes": args.max_body_bytes, "threads": args.threads,
                "precision": "int8" if args.int8 else "float", "cpu_compile": args.cpu_compile}
    quiet = LoggingConfig(enable_access_log=False, log_level="WARNING")
    # "local": a fresh instance, never a cluster some other program left running on this host
    address = args.ray_address or os.environ.get("RAY_ADDRESS") or "local"
    warnings.filterwarnings("ignore", category=FutureWarning, module="ray")
    ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING,
             log_to_driver=False)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        http = {"host": args.host, "port": args.port}
        if not args.insecure:
            http.update(ssl_certfile=os.path.abspath(args.tls_cert),
                        ssl_keyfile=os.path.abspath(args.tls_key))
        serve.start(http_options=HTTPOptions(**http), logging_config=quiet)
        # serve.run below re-reads default HTTP options and logs that it keeps the ones above
        # (TLS included), then "ready at http://": both misleading, so the driver's Serve
        # logger only passes errors
        logging.getLogger("ray.serve").setLevel(logging.ERROR)
        deployment = serve.deployment(
            serve.ingress(app_builder(settings))(), name=DEPLOYMENT,
            num_replicas=args.replicas, logging_config=quiet,
            ray_actor_options={"num_cpus": args.replica_cpus})
        serve.run(deployment.bind(), name=APP_NAME, route_prefix="/")
        banner()
        stop.wait()
    except Exception as e:          # noqa: BLE001 - a deployment error is the user's to read
        print(f"error: Ray Serve: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
    return 0
