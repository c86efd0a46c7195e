"""Colour naming (Berlin & Kay's 11 basic terms from the XKCD survey): image colour distributions,
colour phrases as queries, the colour filter.
"""


from .naming import FILTER_FIELD, colour_filter_mask, describe_colours, phrase_vectors

__all__ = ["describe_colours", "phrase_vectors", "colour_filter_mask", "FILTER_FIELD"]
