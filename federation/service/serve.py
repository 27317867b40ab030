"""`minusfed serve`: load a bundle's server half and a gallery, run the app on uvicorn.

TLS and tokens are on unless `insecure` (development on loopback only; loudly announced).  A
bundle from a smoke preset is served, with a loud warning: its f_p barely recognises anyone.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from federation.service import torch_thread
from federation.service.auth import TokenCheck, TokenError, add_token, read_tokens, revoke_token
from federation.service.gallery import Gallery, GalleryError
from task.bundle import FAR_KEYS, BundleError, smoke_warning

BANNER = "!" * 78
log = logging.getLogger("minusfed.service")


def build(args: argparse.Namespace):
    """(app, uvicorn keyword arguments) or raise ValueError naming what is wrong."""
    from federation.service.app import ServiceSettings, create_app
    from federation.service.model import served_model

    if not args.insecure:
        missing = [name for name, value in (("--tls-cert", args.tls_cert), ("--tls-key", args.tls_key),
                                            ("--tokens", args.tokens)) if not value]
        if missing:
            raise ValueError(f"{', '.join(missing)} missing: the service runs with TLS and API "
                             "tokens (certificates from `minusfed deploy certs`, tokens from "
                             "`minusfed tokens add`); --insecure serves without them, for "
                             "development on loopback only")
        for flag, path in (("--tls-cert", args.tls_cert), ("--tls-key", args.tls_key)):
            if not Path(path).is_file():
                raise ValueError(f"{flag} {path}: file not found")
    # every torch call of this process runs on one thread (federation/service/torch_thread.py)
    served = torch_thread.call(served_model, args.bundle, "int8" if args.int8 else "float")
    bundle = served.bundle
    warning = smoke_warning(bundle.info, "server bundle")
    if warning:
        print(f"{BANNER}\nWARNING: {warning}\n{BANNER}", file=sys.stderr)
    tokens = TokenCheck(read_tokens(args.tokens)) if args.tokens else None
    if args.insecure:
        print(f"{BANNER}\nWARNING: --insecure: no TLS and{' no' if tokens is None else ''} API "
              f"tokens. Development on loopback only.\n{BANNER}", file=sys.stderr)
    gallery = torch_thread.call(Gallery, args.gallery, bundle.embedding_size, served.tag)
    settings = ServiceSettings(far=args.far, max_body_bytes=args.max_body_bytes,
                               cpu_compile=args.cpu_compile)
    app = create_app(served, gallery, tokens, settings)
    kwargs = {"host": args.host, "port": args.port, "access_log": False, "log_level": "warning"}
    if not args.insecure:
        kwargs.update(ssl_certfile=args.tls_cert, ssl_keyfile=args.tls_key)
    return app, kwargs, served, gallery


def cmd_serve(args: argparse.Namespace) -> int:
    import torch
    import uvicorn

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        app, kwargs, served, gallery = build(args)
    except (ValueError, BundleError, GalleryError, TokenError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    logging.getLogger("minusfed.service").setLevel(logging.INFO)
    subjects, templates = torch_thread.call(gallery.counts)
    scheme = "http" if args.insecure else "https"
    where = "" if not args.replicas else f" with {args.replicas} Ray Serve replica(s)"

    def banner() -> None:
        print(f"serving {served.bundle.path} ({served.precision} f_p, FAR {args.far}, threshold "
              f"{served.threshold(args.far):.4f}) "
              f"gallery {args.gallery} ({subjects} subjects, {templates} templates) on "
              f"{scheme}://{args.host}:{args.port}{where}", flush=True)

    if args.replicas:                  # the same app, built in each replica (ray_serve.py)
        gallery.close()
        from federation.service.ray_serve import run_ray_serve
        return run_ray_serve(args, banner)
    banner()
    uvicorn.run(app, **kwargs)
    gallery.close()
    return 0


def cmd_tokens(args: argparse.Namespace) -> int:
    try:
        if args.action == "add":
            token = add_token(args.file, args.site)
            print(f"token for site {args.site} (shown once; only its SHA-256 is stored in "
                  f"{args.file}):\n{token}")
        elif args.action == "revoke":
            revoke_token(args.file, args.site)
            print(f"revoked site {args.site}")
        else:
            for site in sorted(read_tokens(args.file)):
                print(site)
    except TokenError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _replicas(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 64:
        raise argparse.ArgumentTypeError(f"--replicas: expected 0..64, got {value}")
    return value


def add_parsers(sub) -> None:
    p = sub.add_parser("serve", help="run the recognition service on a bundle's server/ half")
    p.add_argument("bundle", metavar="BUNDLE/server", help="a bundle's server/ folder")
    p.add_argument("--gallery", required=True, metavar="PATH",
                   help="SQLite gallery file (created; embeddings, subject ids, timestamps)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8443)
    p.add_argument("--tls-cert", metavar="PEM", help="server certificate (minusfed deploy certs)")
    p.add_argument("--tls-key", metavar="KEY", help="its private key")
    p.add_argument("--tokens", metavar="FILE", help="hashed per-site API tokens (minusfed tokens)")
    p.add_argument("--far", choices=FAR_KEYS, default="1e-3",
                   help="operating point of verify/identify decisions (default 1e-3)")
    p.add_argument("--max-body-bytes", type=int, default=8 * 1024 * 1024)
    p.add_argument("--int8", action="store_true",
                   help="serve the int8 f_p measured by `minusfed bundle int8` (refused when it "
                        "lost more than 0.2 accuracy points on the held-out pairs)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--cpu-compile", action="store_true",
                   help="on a CPU with bf16 units, let the precision policy compile f_p with "
                        "inductor where it measures a win (needs a C++ compiler; start-up "
                        "probes and compiles every batch bucket first, about a minute the first "
                        "time); off: eager f_p")
    p.add_argument("--insecure", action="store_true",
                   help="no TLS, tokens optional: development on loopback only")
    p.add_argument("--replicas", type=_replicas, default=0, metavar="N",
                   help="serve with Ray Serve, N replicas sharing the gallery file (default 0: "
                        "one uvicorn process); joins $RAY_ADDRESS's cluster when set")
    p.add_argument("--replica-cpus", type=float, default=1.0, metavar="C",
                   help="CPUs Ray reserves per replica (default 1)")
    p.add_argument("--ray-address", metavar="ADDR",
                   help="Ray cluster to join (default $RAY_ADDRESS, else a local Ray)")
    p.set_defaults(func=cmd_serve)

    t = sub.add_parser("tokens", help="per-site API tokens of the recognition service")
    t.add_argument("action", choices=("add", "revoke", "list"))
    t.add_argument("file", metavar="FILE", help="tokens file (created 0600)")
    t.add_argument("site", nargs="?", default="", metavar="SITE")
    t.set_defaults(func=cmd_tokens)
