"""kNN's whitening lives in geoindex.whitening (revisit and tuning use it too, below the methods); kept importable
from here."""
from ..whitening import FIT_SAMPLE, Whitening, flat_index  # noqa: F401
