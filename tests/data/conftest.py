"""Fixtures for data tests."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from tests.data.helpers import DEMO_MODEL


@pytest.fixture(scope="session")
def demo_tokenizer():
    return AutoTokenizer.from_pretrained(DEMO_MODEL)
