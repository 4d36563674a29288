"""`geoindex serve`: an HTTP API and a web page over one loaded index.

    from geoindex.serve.app import create_app
    app = create_app(geoindex.load_index("NAME"))      # an ASGI app; run it with uvicorn

Modules: `uploads` turns request bodies into PIL images safely, `batching` embeds requests that
arrive together in one model call, `app` is the FastAPI app, `cli` the click command. Nothing here
imports torch or FastAPI at import time, so `geoindex --help` stays fast.
"""
