"""Errors a user can act on. The CLI prints their message on one line and exits non-zero."""


class GeoindexError(Exception):
    """Base class: anything raised as this is the user's to fix, never a bug to trace."""


class WeightsNotFound(GeoindexError):
    pass


class BackboneMismatch(GeoindexError):
    pass


class ImageError(GeoindexError):
    """An input file is not a usable image; the message is the reason recorded for it."""


class DatasetError(GeoindexError):
    pass


class IndexNotFound(GeoindexError):
    pass
