"""Test-wide settings: offline Hugging Face libraries, float32 matmuls, temp caches."""

import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")
# The allocator setting the jaxpref commands run with (jaxpref/cli.py). glibc reads it at process start,
# so it reaches the pytest-xdist workers and every subprocess a test starts, not this process.
os.environ.setdefault("GLIBC_TUNABLES", "glibc.malloc.hugetlb=1")
# XLA's persistent compilation cache, shared by the xdist workers and every subprocess a test starts: many
# tests compile the same programs (the demo model's initialisation, LoRA adapters, train steps). A size
# limit turns on the cache's eviction and with it the file lock that concurrent writers need.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "jaxpref-tests-xla-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(4 * 2**30))

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _hf_cache(tmp_path_factory, monkeypatch):
    cache = tmp_path_factory.getbasetemp() / "hf_datasets_cache"
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache))
