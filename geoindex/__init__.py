"""geoindex: which city was this street-level photo taken in?

    import geoindex
    report = geoindex.build_index("/data/london.csv", backbone="effnet")
    geoindex.train(report.name)                     # adapt the backbone, a probe head, kNN tuned on val
    index = geoindex.load_index(report.name)
    index.query(["photo.jpg"])
    geoindex.run_bench(index)

Names are imported on first use, so `import geoindex` (and the CLI's listing commands) stay fast.
"""
__version__ = "0.1.0"

_EXPORTS = {
    "Backbone": "backbones", "create_backbone": "backbones", "list_backbones": "backbones",
    "GeoindexError": "errors", "build_index": "build", "GeoIndex": "geo_index", "load_index": "geo_index",
    "list_indexes": "geo_index", "evaluate": "metrics", "run_bench": "bench", "train_probe": "heads",
    "train_finetune": "heads", "tune_knn": "tuning", "scan_dataset": "data", "adapt_index": "adapt",
    "train": "pipeline", "BuildConfig": "config", "ExtractionConfig": "config", "TrainConfig": "config",
    "ServeConfig": "config",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name):
    if name in _EXPORTS:
        import importlib
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'geoindex' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
