"""The loss registry and the public API surface."""

import pytest

import jaxpref.losses as L
from jaxpref.losses import UnknownLossError, get_loss, list_losses, register_loss


def test_builtins_registered():
    for name, fn in {
        "cross_entropy": L.cross_entropy_loss,
        "kd_topk": L.kd_topk_loss,
        "kd": L.kd_loss,
        "dpo": L.dpo_loss,
        "orpo": L.orpo_loss,
        "cpo": L.cpo_loss,
        "simpo": L.simpo_loss,
        "kto": L.kto_loss,
        "reward": L.reward_loss,
        "grpo": L.grpo_loss,
    }.items():
        assert get_loss(name) is fn
        assert name in list_losses()


def test_unknown_name_lists_known_names():
    with pytest.raises(KeyError) as info:
        get_loss("dpoo")
    assert isinstance(info.value, UnknownLossError)
    message = str(info.value)
    assert "'dpoo'" in message and "dpo" in message and "kto" in message and not message.startswith('"')


def test_register_plugin_and_duplicates():
    @register_loss("test_plugin_loss")
    def plugin(x):
        return x.sum(), {}

    try:
        assert get_loss("test_plugin_loss") is plugin
        with pytest.raises(ValueError, match="already registered"):
            register_loss("test_plugin_loss")(lambda x: (x, {}))
        replacement = register_loss("test_plugin_loss", overwrite=True)(lambda x: (x, {}))
        assert get_loss("test_plugin_loss") is replacement
    finally:
        from jaxpref.losses import registry

        registry._REGISTRY.pop("test_plugin_loss", None)


def test_public_api_exports_and_docstrings():
    for name in L.__all__:
        obj = getattr(L, name)
        if callable(obj) and not isinstance(obj, type):
            assert obj.__doc__, f"{name} has no docstring"


def test_losses_import_nothing_from_the_rest_of_jaxpref():
    import ast
    import pathlib

    root = pathlib.Path(L.__file__).parent
    for path in root.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                assert not node.module.startswith("jaxpref") or node.module.startswith(
                    ("jaxpref.losses", "jaxpref.pallas")
                ), f"{path.name} imports {node.module}"
                assert not node.module.startswith(("flax", "torch", "optax")), f"{path.name} imports {node.module}"
            if isinstance(node, ast.ImportFrom) and node.level == 2:
                assert node.module and node.module.startswith("pallas"), f"{path.name}: relative import {node.module}"
            if isinstance(node, ast.Import):
                for alias in node.names:
                    assert not alias.name.startswith(("flax", "torch", "optax")), f"{path.name} imports {alias.name}"
