"""Tests never reach a model hub: everything they load is made on the spot or shipped in a package."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


import pytest  # noqa: E402 - after the environment above, which must be set before anything imports transformers


@pytest.fixture(scope="session")
def digit_shards(tmp_path_factory):
    """The digits shards (train-*.tar and val-*.tar), built once per test session."""
    from data_tools.digits import write_digits

    out = tmp_path_factory.mktemp("digits")
    write_digits(out)
    return out
