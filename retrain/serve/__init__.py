"""`retrain serve RUN`: an HTTP API and a web page for a trained model.

This module is the command line (add_arguments, main); the server is in the modules beside it:

    config.py       ServeConfig: every setting, its default and allowed range
    app.py          create_app: the FastAPI app, its routes (/v1/classify, /v1/classify/batch,
                    /v1/model, /healthz, /openapi.json, the page at /) and error answers
    service.py      Service: what the handlers share; one image's way from bytes to labels
    batcher.py      MicroBatcher: concurrent requests share model calls
    limits.py       body size and time, pixels per image / request / in flight, early answers
    auth.py         the API key
    schema.py       the OpenAPI spec
    http_errors.py  ApiError -> {"error": {"code", "message"}}

Every input is bounded: body size (--max-upload-mb), pixels per image (images.MAX_PIXELS),
decoded pixels per request (--max-request-pixels) and in flight (--max-inflight-pixels: memory),
images per batch request, requests in flight. The server never takes a file path from a
request: the page's three files are read from the package once, at start.
"""

import ipaddress
import os
import sys
from pathlib import Path

from retrain.errors import ConfigError, MissingDependency
from retrain.serve.config import API_KEY_ENV, PIXEL_WAIT_S, ServeConfig, pixels

__all__ = ["ServeConfig", "add_arguments", "create_app", "main"]

_ENV_CONFIG = "RETRAIN_SERVE_CONFIG"


def __getattr__(name):
    """`retrain.serve.create_app`, imported when asked for (it imports FastAPI)."""
    if name == "create_app":
        from retrain.serve.app import create_app

        return create_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def add_arguments(p) -> None:
    d = ServeConfig()  # the defaults
    p.add_argument("run", metavar="RUN", help="run folder or model.onnx written by retrain fit")
    p.add_argument("--host", default=d.host,
                   help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 for the network)")
    p.add_argument("--port", type=int, default=d.port, help=f"port (default {d.port})")
    p.add_argument("--workers", type=int, default=d.workers,
                   help=f"server processes, each with the model loaded (default {d.workers})")
    p.add_argument("--api-key", "--api_key", default=None,
                   help=f"require this key on every endpoint but /healthz (default: ${API_KEY_ENV} if set)")
    p.add_argument("--max-upload-mb", "--max_upload_mb", type=float, default=d.max_upload_mb,
                   help=f"largest request body in MB (default {d.max_upload_mb:g})")
    p.add_argument("--max-batch", "--max_batch", type=int, default=None,
                   help="most images in one model call when requests arrive together (default 4 on CPU, 32 on GPU)")
    p.add_argument("--batch-wait-ms", "--batch_wait_ms", type=float, default=None,
                   help="how long a lone request waits for others to share its model call (default 0 on CPU, 2 on GPU)")
    p.add_argument("--max-pending", "--max_pending", type=int, default=d.max_pending,
                   help=f"requests in flight before new ones get 503 (default {d.max_pending}; bounds memory)")
    p.add_argument("--body-timeout-s", "--body_timeout_s", type=float, default=d.body_timeout_s,
                   help=f"seconds a request body may take to arrive (default {d.body_timeout_s:g})")
    p.add_argument("--max-request-pixels", "--max_request_pixels", type=pixels, default=d.max_request_pixels, metavar="N",
                   help="decoded pixels one request may take, all its images together (default "
                        f"{d.max_request_pixels:,}; a JPEG counts at the reduced size it is decoded at); "
                        "past it: 413")
    p.add_argument("--max-inflight-pixels", "--max_inflight_pixels", type=pixels, default=d.max_inflight_pixels, metavar="N",
                   help=f"pixels being decoded at once over all requests (default {d.max_inflight_pixels:,}: "
                        "bounds memory, 3-4 bytes each); an image waits for room, smallest first, "
                        f"up to {PIXEL_WAIT_S:g} s, then 503")
    p.add_argument("--top-k", "--top_k", type=int, default=d.top_k,
                   help=f"labels per image unless ?top_k= (default {d.top_k})")
    p.add_argument("--provider", default=d.provider, help="auto, cpu, cuda or tensorrt")
    p.add_argument("--threads", type=int, default=None,
                   help="ONNX Runtime threads per model call (default on CPU: 1, with one call per core at once)")
    p.add_argument("-q", "--quiet", action="store_true", help="no per-request log lines")


def _app_from_env():
    """App factory for uvicorn worker processes (--workers > 1): settings travel as JSON in the env."""
    import json

    from retrain.serve.app import create_app

    cfg = json.loads(os.environ[_ENV_CONFIG])
    key = os.environ.get(API_KEY_ENV) or None
    return create_app(cfg.pop("model"), ServeConfig(**cfg, api_key=key))


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_port(host: str, port: int) -> None:
    import socket

    if not 0 <= port <= 65535:
        raise ConfigError(f"--port must be between 0 and 65535, got {port}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise ConfigError(f"--host '{host}' is not an address this machine has ({e.strerror})") from None
    family, _, _, _, addr = infos[0]
    s = socket.socket(family, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(addr)
    except OSError as e:
        raise ConfigError(f"cannot listen on {host}:{port} ({e.strerror}); is another server using it? "
                          "choose another with --port") from None
    finally:
        s.close()


def main(args) -> int:
    try:
        import uvicorn
    except ImportError:
        raise MissingDependency("retrain serve needs uvicorn; install it with: pip install 'retrain[serve]'") from None

    cfg = ServeConfig.from_args(args).check("workers", "top_k")  # create_app checks the rest
    from retrain.serve.app import create_app

    # Load the model here even with several workers: a bad RUN is one error line, not N tracebacks.
    app = create_app(args.run, cfg)
    _check_port(args.host, args.port)
    key = cfg.api_key
    if not _is_loopback(args.host) and not key:
        print(f"warning: listening on {args.host} without an API key: anyone who can reach this machine "
              f"can use the model (set --api-key or ${API_KEY_ENV})", file=sys.stderr)
    clf = app.state.classifier
    shown = f"[{args.host}]" if ":" in args.host else args.host
    print(f"retrain serve: {app.state.model_id} ({len(clf.labels)} labels) on http://{shown}:{args.port}/ "
          f"- API /v1/classify, spec /openapi.json{', API key required' if key else ''}; Ctrl+C to stop",
          file=sys.stderr, flush=True)
    common = {"host": args.host, "port": args.port, "log_level": "warning" if args.quiet else "info",
              "access_log": not args.quiet, "server_header": False, "timeout_graceful_shutdown": 5}
    if args.workers == 1:
        uvicorn.run(app, **common)
    else:
        import json

        del app  # each worker process loads its own copy
        os.environ[_ENV_CONFIG] = json.dumps({"model": str(Path(args.run).resolve()), **cfg.to_env()})
        if key:
            os.environ[API_KEY_ENV] = key
        uvicorn.run("retrain.serve:_app_from_env", factory=True, workers=args.workers, **common)
    return 0
