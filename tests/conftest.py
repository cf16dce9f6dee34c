import os

import pytest

# Tests never touch the network, and never write into the user's real cache of runs.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def model():
    """The embedded SmolLM2-135M, loaded once per test session."""
    from rephelpers.models import load_model

    return load_model()
