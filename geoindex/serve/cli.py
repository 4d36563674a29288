"""The `geoindex serve` command (registered on the main group with `main.add_command(serve)`).

Only click is imported here: torch, FastAPI and uvicorn load when the command runs, so
`geoindex --help` and `geoindex serve --help` stay fast.
"""
from __future__ import annotations

import json
import os

import click

from ..runtime_choice import runtime_option
from ..config import ServeConfig

# What create_app takes from the config here (host, port, workers, threads and connections are the server's;
# root_path is uvicorn's, so the app is not given it twice).
APP_OPTIONS = ("max_upload_mb", "max_request_mb", "max_inflight_mb", "max_files", "max_pixels", "reload_check_s",
               "max_batch", "max_wait_ms", "decode_threads", "k")

EPILOG = """\b
Start it:
  geoindex serve --index NAME                 # then open http://127.0.0.1:8000/
  curl -F image=@photo.jpg http://127.0.0.1:8000/v1/locate
  curl --data-binary @photo.jpg -H 'Content-Type: image/jpeg' http://127.0.0.1:8000/v1/locate
API documentation (OpenAPI): http://127.0.0.1:8000/docs

\b
Behind a reverse proxy: keep --host 127.0.0.1 and let the proxy face the network. To publish
it under a path prefix, e.g. https://example.org/geoindex/, with nginx:
  location /geoindex/ {
      proxy_pass http://127.0.0.1:8000/;     # the trailing / strips the prefix
      proxy_set_header Host $host;
      proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
      proxy_set_header X-Forwarded-Proto $scheme;
      client_max_body_size 100m;             # at least --max-request-mb
      proxy_read_timeout 60s;
  }
and start geoindex with the same prefix, so /docs and the OpenAPI schema name the public URLs:
  geoindex serve --index NAME --root-path /geoindex
X-Forwarded-For/-Proto are trusted only from --forwarded-allow-ips (default 127.0.0.1, the
proxy on this host). The page uses relative URLs, so it works under any prefix that ends in /.
"""


@click.command("serve", epilog=EPILOG,
               context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--index", "index_name", default=None, help="Index name or path [default: the latest built].")
@click.option("--index-dir", type=click.Path(file_okay=False), default=None,
              help="Where indexes live [default: $GEOINDEX_HOME or ./indexes].")
@click.option("--host", default=ServeConfig.host, show_default=True,
              help="Interface to listen on; 0.0.0.0 exposes it to the network (prefer a reverse proxy).")
@click.option("--port", type=click.IntRange(0, 65535), default=ServeConfig.port, show_default=True)
@click.option("--workers", type=click.IntRange(1), default=ServeConfig.workers, show_default=True,
              help="Server processes, each with its own copy of the model. One is best on a small CPU: "
                   "micro-batching already keeps the cores busy.")
@click.option("--max-upload-mb", type=click.FloatRange(min=0.001), default=ServeConfig.max_upload_mb, show_default=True,
              help="Largest photo accepted; bigger ones get a 413.")
@click.option("--max-request-mb", type=click.FloatRange(min=0.001), default=ServeConfig.max_request_mb,
              show_default=True,
              help="Largest request body (a batch of photos); bigger ones get a 413.")
@click.option("--max-inflight-mb", type=click.FloatRange(min=0.001), default=ServeConfig.max_inflight_mb,
              show_default=True, help="Upload bytes held in memory by all requests together; past it, 503 and "
                                      "Retry-After.")
@click.option("--max-files", type=click.IntRange(1), default=ServeConfig.max_files, show_default=True,
              help="Most photos in one /v1/locate/batch request.")
@click.option("--max-pixels", type=click.IntRange(1), default=ServeConfig.max_pixels, show_default=True,
              help="Largest image, in pixels after JPEG's reduced-scale decoding, checked before decoding (the "
                   f"same default as build and query); PNG, WebP, BMP and TIFF are decoded whole, up to "
                   f"{ServeConfig.max_unscaled_pixels / 1e6:g} MP.")
@click.option("--reload-check-s", type=click.FloatRange(min=0), default=ServeConfig.reload_check_s, show_default=True,
              help="How often to check whether the index on disk changed (a build, train or rm), to load it whole "
                   "and answer from it; 0 never checks.")
@click.option("--max-batch", type=click.IntRange(1), default=ServeConfig.max_batch, show_default=True,
              help="Most photos embedded in one model call (1 turns micro-batching off).")
@click.option("--max-wait-ms", type=click.FloatRange(min=0), default=ServeConfig.max_wait_ms, show_default=True,
              help="How long a photo may wait for others to share its batch.")
@click.option("--decode-threads", type=click.IntRange(1), default=ServeConfig.decode_threads,
              help="Threads decoding uploads [default: cores, at most 4].")
@click.option("--torch-threads", type=click.IntRange(1), default=ServeConfig.torch_threads,
              help="CPU threads of the model in all, divided among --model-threads [default: torch's own, "
                   "divided among --workers].")
@click.option("--model-threads", type=click.IntRange(1), default=ServeConfig.model_threads,
              help="Batches run at once, each on its share of --torch-threads [default: 2 on a CPU of 2 or more "
                   "cores, where two one-thread batches side by side outrun one two-thread batch; 1 on a GPU].")
@click.option("--k", type=click.IntRange(1, 200), default=ServeConfig.k,
              help="Neighbours that vote [default: as tuned on val by `geoindex train`].")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default=ServeConfig.device, show_default=True,
              help="auto uses a CUDA GPU when torch sees one.")
@runtime_option
@click.option("--root-path", default=ServeConfig.root_path,
              help="Path prefix the reverse proxy publishes this under, e.g. /geoindex.")
@click.option("--forwarded-allow-ips", default=ServeConfig.forwarded_allow_ips, show_default=True,
              help="Proxies whose X-Forwarded-* headers are trusted (comma-separated, or *).")
@click.option("--max-connections", type=click.IntRange(1), default=ServeConfig.max_connections,
              help="Open connections at most; when full, the one waiting longest for its headers is closed "
                   "[default: well below the file descriptor limit (ulimit -n), at most 1024].")
@click.option("--header-timeout", type=click.FloatRange(min=0.1), default=ServeConfig.header_timeout, show_default=True,
              help="Seconds a client has to send a request's headers (and an idle keep-alive connection is kept).")
@click.option("--body-timeout", type=click.FloatRange(min=0.1), default=ServeConfig.body_timeout, show_default=True,
              help="Seconds a request body may send nothing before the connection is closed.")
@click.option("--log-level", type=click.Choice(["critical", "error", "warning", "info", "debug"]),
              default=ServeConfig.log_level,
              show_default=True)
def serve(index_name, index_dir, host, port, workers, max_upload_mb, max_request_mb, max_inflight_mb, max_files,
          max_pixels, reload_check_s, max_batch, max_wait_ms, decode_threads, torch_threads, model_threads, k, device,
          root_path, forwarded_allow_ips, max_connections, header_timeout, body_timeout, log_level):
    """An HTTP API and a web page: drop a photo, see where it was taken.

    Loads the index, its backbone and its classifier head once, then answers POST /v1/locate
    (one photo), POST /v1/locate/batch (several), GET /v1/index, GET /healthz, thumbnails of
    indexed photos at GET /v1/photos/ROW, and the page at GET /. Photos that arrive together are
    embedded together (dynamic micro-batching). Nothing from an upload is written to disk.
    """
    from ..errors import GeoindexError
    from . import INSTALL_HINT, missing_packages

    missing = missing_packages()
    if missing:
        raise click.ClickException(f"geoindex serve needs its extra, and {', '.join(missing)} "
                                   f"{'is' if len(missing) == 1 else 'are'} not installed: {INSTALL_HINT}")
    config = ServeConfig(host=host, port=port, workers=workers, max_upload_mb=max_upload_mb,
                         max_request_mb=max_request_mb, max_inflight_mb=max_inflight_mb, max_files=max_files,
                         max_pixels=max_pixels, reload_check_s=reload_check_s, max_batch=max_batch,
                         max_wait_ms=max_wait_ms, decode_threads=decode_threads, torch_threads=torch_threads,
                         model_threads=model_threads, k=k, device=device, root_path=root_path,
                         forwarded_allow_ips=forwarded_allow_ips, max_connections=max_connections,
                         header_timeout=header_timeout, body_timeout=body_timeout, log_level=log_level)
    try:
        _run(config, index_name, index_dir)
    except GeoindexError as exc:
        raise click.ClickException(str(exc)) from None


def split_threads(total: int, model_threads: int | None, device_type: str) -> tuple[int, int]:
    """(batches at once, torch threads of each) for `total` CPU threads of the model."""
    if model_threads is None:
        model_threads = 2 if device_type == "cpu" and total >= 2 else 1
    return model_threads, max(1, total // model_threads)


def _run(config: ServeConfig, index_name, index_dir):
    import torch
    import uvicorn

    from ..extraction import resolve_device
    from ..geo_index import load_index, resolve_index_path, default_index_name

    host, port, workers, device = config.host, config.port, config.workers, config.device
    root_path, log_level = config.root_path, config.log_level
    options = {name: getattr(config, name) for name in APP_OPTIONS}
    connections = {"max_connections": config.max_connections, "header_timeout": config.header_timeout,
                   "body_timeout": config.body_timeout}
    model_threads, threads = split_threads(config.torch_threads or max(1, torch.get_num_threads() // workers),
                                           config.model_threads, resolve_device(device).type)
    options["model_threads"] = model_threads
    torch.set_num_threads(threads)
    path = resolve_index_path(index_name or default_index_name(index_dir), index_dir)  # fail fast, one line
    from .connections import GuardedH11Protocol, listen_backlog, log_config

    GuardedH11Protocol.configure(**connections)
    os.environ["GEOINDEX_SERVE_CONNECTIONS"] = json.dumps(connections)  # for --workers processes
    common = dict(host=host, port=port, log_level=log_level, proxy_headers=True, log_config=log_config(log_level),
                  forwarded_allow_ips=config.forwarded_allow_ips, root_path=root_path.rstrip("/"),
                  http="geoindex.serve.connections:GuardedH11Protocol", backlog=listen_backlog(),
                  timeout_keep_alive=max(1, int(connections["header_timeout"])))
    where = f"http://{'localhost' if host in ('127.0.0.1', '::1') else host}:{port}{root_path.rstrip('/')}/"
    if workers == 1:
        index = load_index(path, device=device)
        from .app import create_app
        app = create_app(index, **options)
        click.echo(f"geoindex serve: index {index.name!r} ({index.manifest['backbone']}, {len(index.classes)} cities, "
                   f"{index.manifest['counts']['train']} photos), {model_threads} model thread(s) of {threads} torch "
                   f"thread(s), max batch {options['max_batch']}; page at {where}", err=True)
        uvicorn.run(app, **common)
        return
    # Several processes need an importable factory; each loads its own copy of the index.
    os.environ["GEOINDEX_SERVE_OPTIONS"] = json.dumps({**options, "index": str(path), "index_dir": None,
                                                       "device": device})
    os.environ["GEOINDEX_SERVE_TORCH_THREADS"] = str(threads)
    click.echo(f"geoindex serve: index {path.name!r} in {workers} processes, each {model_threads} model thread(s) "
               f"of {threads} torch thread(s); "
               f"page at {where}", err=True)
    uvicorn.run("geoindex.serve.app:create_app_from_env", factory=True, workers=workers, **common)
