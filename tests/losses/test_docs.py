"""Every ```python block of docs/losses.md runs (each in a fresh namespace), so the page cannot rot."""

import contextlib
import io
import pathlib
import re

import pytest

DOC = pathlib.Path(__file__).resolve().parents[2] / "docs" / "losses.md"
BLOCKS = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)


def test_doc_has_one_example_per_loss():
    text = "\n".join(BLOCKS)
    for fn in (
        "cross_entropy_loss",
        "kd_topk_loss",
        "kd_loss",
        "dpo_loss",
        "orpo_loss",
        "simpo_loss",
        "cpo_loss",
        "kto_loss",
        "reward_loss",
        "grpo_loss",
        "group_advantages",
        "register_loss",
        "sequence_logps",
    ):
        assert f"{fn}(" in text, fn


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_doc_example_runs(index):
    from jaxpref.losses import registry

    before = set(registry._REGISTRY)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            exec(
                compile(BLOCKS[index], f"docs/losses.md block {index}", "exec"),
                {"__name__": "__doc_example__"},
            )
    finally:
        for name in set(registry._REGISTRY) - before:  # the registry example registers a loss
            registry._REGISTRY.pop(name)
