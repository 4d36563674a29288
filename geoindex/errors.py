"""Errors a user can act on. The CLI prints their message on one line and exits non-zero."""


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
