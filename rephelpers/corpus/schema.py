"""The corpus table's columns and chunk-length bounds: what every corpus, built-in or the user's, agrees on.

A module of its own so the loaders and the built-in demo corpus both read it without
importing each other.
"""

CORPUS_COLUMNS = ("id", "doc_id", "text", "source", "domain")
MIN_CHARS = 200
MAX_CHARS = 1500
