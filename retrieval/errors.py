"""Typed errors raised by the Loupe library.

The library never prints or exits: it raises one of these with a message that says what to do.
The server maps them to 4xx JSON (``code`` is the JSON error code, ``http_status`` the status);
the CLI maps them to one clear line on stderr and a non-zero exit.
"""

from __future__ import annotations


class LoupeError(Exception):
    """Base class of every error Loupe raises on purpose."""

    code = "loupe_error"
    http_status = 400


class UnknownEncoderError(LoupeError, KeyError):
    code = "unknown_encoder"
    http_status = 400

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class MissingWeightsError(LoupeError):
    code = "missing_weights"
    http_status = 503


class MissingExtraError(LoupeError, ImportError):
    code = "missing_extra"
    http_status = 503


class UnsupportedModalityError(LoupeError):
    code = "unsupported_modality"
    http_status = 400


class InvalidImageError(LoupeError, ValueError):
    code = "invalid_image"
    http_status = 400


class ImageTooLargeError(InvalidImageError):
    code = "image_too_large"
    http_status = 413


class InvalidQueryError(LoupeError, ValueError):
    code = "invalid_query"
    http_status = 400


class InvalidFieldError(InvalidQueryError):
    """A request field of the wrong type or out of its range, or a field the request does not take."""

    code = "bad_request"


class UnknownIdError(LoupeError, KeyError):
    code = "not_found"
    http_status = 404

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class IndexFormatError(LoupeError):
    code = "index_format"
    http_status = 500


class IndexLockedError(LoupeError):
    code = "index_locked"
    http_status = 409


class EmptyTextDatabaseError(LoupeError, ValueError):
    code = "empty_text_database"
    http_status = 400


class UnknownVocabularyError(LoupeError, KeyError):
    code = "unknown_vocabulary"
    http_status = 400

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class BuildCancelled(Exception):
    """A background build was stopped (the process is exiting)."""


class WarmingUpError(LoupeError):
    """A text database is still being built or opened in the background (``warm_classifier``)."""

    code = "warming_up"
    http_status = 503


class InputError(LoupeError):
    """One input cannot be read (the run goes on; the reason lands in the summary's ``failed``)."""

    code = "bad_input"
