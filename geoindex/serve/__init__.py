"""`geoindex serve`: an HTTP API and a web page over one loaded index.

    from geoindex.serve.app import create_app
    app = create_app(geoindex.load_index("NAME"))      # an ASGI app; run it with uvicorn

Modules: `uploads` turns request bodies into PIL images safely, `batching` embeds requests that
arrive together in one model call, `app` is the FastAPI app, `cli` the click command. Nothing here
imports torch or FastAPI at import time, so `geoindex --help` stays fast.
"""

# the serve extra's modules that `geoindex serve` cannot run without (python-multipart is imported as either name)
REQUIRED_MODULES = {"fastapi": ("fastapi",), "uvicorn": ("uvicorn",), "python-multipart": ("python_multipart", "multipart")}


def missing_packages() -> list[str]:
    """The serve extra's packages that are not installed (distribution names, for pip)."""
    import sys
    from importlib.util import find_spec

    def installed(module: str) -> bool:
        if module in sys.modules:  # imported already, or None where an import of it was blocked
            return sys.modules[module] is not None
        return find_spec(module) is not None

    return [package for package, modules in REQUIRED_MODULES.items() if not any(map(installed, modules))]
