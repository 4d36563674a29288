"""The ways geoindex answers "which city?", as one family: `predict(photos) -> Answer` with (N, C) probabilities
and a GPS guess per photo. `query`, `bench` and the service all call these objects."""
from .base import Answer, Photos, break_ties, city_centres
from .classifier import ClassifierMethod, classifier_methods
from .hybrid import HybridMethod, choose_weights, fuse
from .knn import KNNMethod
from .zeroshot import ZeroShotMethod

__all__ = ["Answer", "Photos", "KNNMethod", "ClassifierMethod", "ZeroShotMethod", "HybridMethod", "classifier_methods",
           "city_centres", "break_ties", "fuse", "choose_weights"]
