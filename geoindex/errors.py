"""Errors a user can act on. The CLI prints their message on one line and exits non-zero.

Every exception class of the library lives here, so one import names them all; the modules that raised
them first re-export theirs. The service's own signals (an HTTP answer to give, a client gone, a full
queue) stay in geoindex.serve: they carry a status code or steer control flow, and never reach a user
of the library."""


class GeoindexError(Exception):
    """Base class: anything raised as this is the user's to fix, never a bug to trace."""


class WeightsNotFound(GeoindexError):
    pass


class BackboneMismatch(GeoindexError):
    pass


class ImageError(GeoindexError):
    """An input file is not a usable image; the message is the reason recorded for it.

    kind says which way ("not_an_image", "too_many_pixels", "corrupt", "unreadable"), so the service can
    answer with the matching HTTP status without parsing the message.
    """

    def __init__(self, message: str, kind: str = "corrupt"):
        super().__init__(message)
        self.kind = kind


class DatasetError(GeoindexError):
    pass


class IndexNotFound(GeoindexError):
    pass


class IndexCorrupt(GeoindexError):
    """An index file is missing, damaged, or not the one its manifest describes."""


class IndexBusy(GeoindexError):
    """Another process holds the index's lock (a writer, or readers while a writer waits)."""


class IndexReplaced(GeoindexError):
    """The index was replaced or removed on disk while this process held it open."""


class NotFittedError(GeoindexError, RuntimeError):
    """A method used before `fit` chose what it needs from validation photos (scikit-learn's name).

    A RuntimeError too, which an unfitted hybrid raised before."""
