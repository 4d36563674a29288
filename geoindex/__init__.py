"""geoindex: which city was this street-level photo taken in?"""
__version__ = "0.1.0"

from .backbones import Backbone, create_backbone, list_backbones  # noqa: E402
from .errors import GeoindexError  # noqa: E402
from .build import build_index  # noqa: E402

__all__ = ["Backbone", "create_backbone", "list_backbones", "build_index", "GeoindexError", "__version__"]
