"""Test-wide settings: offline Hugging Face libraries, float32 matmuls, temp caches."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")
# The allocator setting the jaxpref commands run with (jaxpref/cli.py). glibc reads it at process start,
# so it reaches the pytest-xdist workers and every subprocess a test starts, not this process.
os.environ.setdefault("GLIBC_TUNABLES", "glibc.malloc.hugetlb=1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _hf_cache(tmp_path_factory, monkeypatch):
    cache = tmp_path_factory.getbasetemp() / "hf_datasets_cache"
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache))
