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

    def __init_subclass__(cls, *, code: str | None = None, status: int | None = None, **kwargs):
        super().__init_subclass__(**kwargs)
        if code is not None:
            cls.code = code             # the JSON error code
        if status is not None:
            cls.http_status = status    # the HTTP status the server answers with


class UnknownEncoderError(LoupeError, KeyError, code="unknown_encoder", status=400):
    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class MissingWeightsError(LoupeError, code="missing_weights", status=503):
    pass


class MissingExtraError(LoupeError, ImportError, code="missing_extra", status=503):
    pass


class UnsupportedModalityError(LoupeError, code="unsupported_modality", status=400):
    pass


class InvalidImageError(LoupeError, ValueError, code="invalid_image", status=400):
    pass


class ImageTooLargeError(InvalidImageError, code="image_too_large", status=413):
    pass


class InvalidQueryError(LoupeError, ValueError, code="invalid_query", status=400):
    pass


class InvalidFieldError(InvalidQueryError, code="bad_request"):
    """A request field of the wrong type or out of its range, or a field the request does not take."""


class UnknownIdError(LoupeError, KeyError, code="not_found", status=404):
    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class IndexFormatError(LoupeError, code="index_format", status=503):
    """The index on disk is damaged, incomplete or not a Loupe index: the server answers 503 (it cannot
    serve until the index is repaired or replaced; a re-index it can open is picked up by the reload)."""


class IndexLockedError(LoupeError, code="index_locked", status=409):
    pass


class EmptyTextDatabaseError(LoupeError, ValueError, code="empty_text_database", status=400):
    pass


class UnknownVocabularyError(LoupeError, KeyError, code="unknown_vocabulary", status=400):
    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class BuildCancelled(Exception):
    """A background build was stopped (the process is exiting)."""


class WarmingUpError(LoupeError, code="warming_up", status=503):
    """A text database is still being built or opened in the background (``warm_classifier``)."""


class InputError(LoupeError, code="bad_input"):
    """One input cannot be read (the run goes on; the reason lands in the summary's ``failed``)."""
