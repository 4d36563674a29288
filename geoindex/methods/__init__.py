"""The ways geoindex answers "which city?", as one family: `predict(photos) -> Answer` with (N, C) probabilities
and a GPS guess per photo. `query`, `bench` and the service all call these objects.

Every module of this package is imported here, and each method class registers itself by family name
(`base.register_method`): a new method is one module, found through `registered_methods()`."""
import importlib
import pkgutil

from .base import Answer, Method, Photos, break_ties, city_centres, register_method, registered_methods
from .classifier import ClassifierMethod, classifier_methods
from .hybrid import HybridMethod, choose_weights, fuse
from .knn import KNNMethod
from .zeroshot import ZeroShotMethod

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["Answer", "Method", "Photos", "KNNMethod", "ClassifierMethod", "ZeroShotMethod", "HybridMethod",
           "classifier_methods", "city_centres", "break_ties", "fuse", "choose_weights", "register_method",
           "registered_methods"]
