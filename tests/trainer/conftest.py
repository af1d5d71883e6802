"""Fixtures of the trainer tests: one thread, the toy tokenizer built once per session."""

from __future__ import annotations

import pytest
import torch

from tests.trainer.toy import make_tokenizer

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def toy_tokenizer(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("toy_tokenizer"))
