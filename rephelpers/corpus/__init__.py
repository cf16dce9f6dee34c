"""Stage 01 (notebook ``01_corpus_clusters``): a corpus, its chunks and their clusters.

- :mod:`.loaders`: the generic readers (text/JSONL/parquet files, local Hugging Face
  datasets) and chunking;
- :mod:`.schema`: the corpus table's columns and chunk-length bounds;
- :mod:`.holdout`: what the ability suite keeps out of the corpus (read by stage 05 too);
- :mod:`.demo`: the built-in demo corpus, built from material installed on every machine;
- :mod:`.embeddings`: document embeddings (the embedded MiniLM, exact or as a static
  word-piece table distilled from it for large corpora);
- :mod:`.clustering`: k-means, BERTopic, LDA and metadata domains, with validation.
"""
