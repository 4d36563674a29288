"""`geoindex serve`: an HTTP API and a web page over one loaded index.

    from geoindex.serve.app import create_app
    app = create_app(geoindex.load_index("NAME"))      # an ASGI app; run it with uvicorn

Modules: `uploads` turns request bodies into PIL images safely, `batching` embeds requests that
arrive together in one model call, `app` is the FastAPI app, `cli` the click command. Nothing here
imports torch or FastAPI at import time, so `geoindex --help` stays fast.
"""

# the serve extra's packages that `geoindex serve` cannot run without, and the module each is imported as
REQUIRED_MODULES = {"fastapi": "fastapi", "uvicorn": "uvicorn", "python-multipart": "python_multipart"}
INSTALL_HINT = "pip install 'geoindex[serve]'"


def missing_packages() -> list[str]:
    """The serve extra's packages that do not import (distribution names, for pip). Imported, not looked up: one
    installed but broken (a dependency of it missing) must be named here, not fail later with a traceback."""
    import importlib

    missing = []
    for package, module in REQUIRED_MODULES.items():
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(package)
    return missing
