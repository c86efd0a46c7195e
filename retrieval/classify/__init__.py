"""Vocabulary-free classification (CaSED): name what is in an image by retrieving from a text
database, without a fixed label list.
"""


from .classifier import ClassifyConfig, VocabularyFreeClassifier, make_classifier
from .vocab import open_vocabulary

__all__ = ["VocabularyFreeClassifier", "ClassifyConfig", "make_classifier", "open_vocabulary"]
