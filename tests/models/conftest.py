"""Fixtures for model tests."""

from __future__ import annotations

import pytest

from tests.models.tiny import build_hf


@pytest.fixture
def hf_checkpoint(tmp_path):
    """Factory: save a tiny random HF model of ``case`` and return (directory, torch model)."""

    def make(case: str, seed: int = 0, **overrides):
        model = build_hf(case, seed, **overrides)
        path = tmp_path / f"{case}-{seed}"
        model.save_pretrained(path)
        return path, model

    return make
