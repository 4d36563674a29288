"""geoindex: which city was this street-level photo taken in?

    import geoindex
    report = geoindex.build_index("/data/GSV-Cities", backbone="effnet")
    index = geoindex.load_index(report.name)
    index.query(["photo.jpg"])
    geoindex.run_bench(index)
"""
__version__ = "0.1.0"

from .backbones import Backbone, create_backbone, list_backbones  # noqa: E402
from .errors import GeoindexError  # noqa: E402
from .build import build_index  # noqa: E402
from .geo_index import GeoIndex, load_index, list_indexes  # noqa: E402
from .metrics import evaluate  # noqa: E402
from .bench import run_bench  # noqa: E402
from .heads import train_finetune, train_probe  # noqa: E402

__all__ = ["Backbone", "create_backbone", "list_backbones", "build_index", "GeoIndex", "load_index", "list_indexes",
           "evaluate", "run_bench", "train_probe", "train_finetune", "GeoindexError", "__version__"]
