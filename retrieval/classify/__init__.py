"""Vocabulary-free classification (CaSED): name what is in an image by retrieving from a text
database, without a fixed label list.

``classifier``: the CaSED scoring (:class:`VocabularyFreeClassifier`, :func:`make_classifier`);
``registry``: the classifiers an index shares between requests and their background warm-ups
(:class:`ClassifierRegistry`, one per engine: :func:`classifiers_of`); ``vocab`` / ``names``: the text
databases and the stored embeddings of their candidate names.
"""


from .classifier import ClassifyConfig, Label, VocabularyFreeClassifier, make_classifier
from .registry import ClassifierRegistry, classifiers_of
from .vocab import open_vocabulary

__all__ = ["VocabularyFreeClassifier", "ClassifyConfig", "Label", "make_classifier", "open_vocabulary",
           "ClassifierRegistry", "classifiers_of"]
