"""Stage 02 (notebook ``02_representations``): the model and its hidden representations.

- :mod:`.models`: loading a model (the embedded SmolLM2-135M or any HF id) behind nnsight;
- :mod:`.activations`: pooled per-document activations per layer, cached;
- :mod:`.tokenstats`: per-token statistics (attention sinks, massive dimensions).
"""
