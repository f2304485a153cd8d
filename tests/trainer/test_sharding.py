"""Mesh-shape resolution and logical-axis rules (multi-device runs are in the scale-out tests)."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxpref.errors import ConfigError
from jaxpref.sharding import logical_to_spec, mesh_shape


@pytest.mark.parametrize(
    "sizes, n, expected",
    [
        (None, 8, (8, 1, 1)),
        ({"fsdp": -1}, 8, (1, 8, 1)),
        ({"data": 2, "fsdp": 2, "tensor": 2}, 8, (2, 2, 2)),
        ({"tensor": 2}, 8, (4, 1, 2)),
        ({"data": -1, "tensor": 4}, 8, (2, 1, 4)),
    ],
)
def test_mesh_shape(sizes, n, expected):
    assert mesh_shape(sizes, n) == expected


@pytest.mark.parametrize(
    "sizes, match",
    [
        ({"data": -1, "fsdp": -1}, "at most one axis"),
        ({"data": 3}, "does not divide"),
        ({"data": 2, "fsdp": 2, "tensor": 1}, "set one axis to -1"),
        ({"model": 2}, "unknown axis"),
    ],
)
def test_mesh_shape_errors(sizes, match):
    with pytest.raises(ConfigError, match=match):
        mesh_shape(sizes, 8)


class FakeMesh:
    def __init__(self, **shape):
        self.shape = shape


def test_logical_to_spec_rules_divisibility_and_reuse():
    mesh = FakeMesh(data=2, fsdp=4, tensor=2)
    assert logical_to_spec(("embed", "mlp"), (64, 128), mesh, None) == P("fsdp", "tensor")
    # vocab -> tensor; embed -> fsdp
    assert logical_to_spec(("vocab", "embed"), (100, 64), mesh, None) == P("tensor", "fsdp")
    # 6 is not divisible by fsdp=4: replicated
    assert logical_to_spec(("embed", "mlp"), (6, 128), mesh, None) == P(None, "tensor")
    # heads and kv_heads both map to tensor: the second use stays replicated
    assert logical_to_spec(("heads", "kv_heads"), (4, 4), mesh, None) == P("tensor", None)
    # overriding rules; list values mean several mesh axes
    assert logical_to_spec(("embed",), (64,), mesh, [("embed", ["data", "fsdp"])]) == P(("data", "fsdp"))
    assert logical_to_spec(None, (3,), mesh, None) == P()
    # axes of size 1 are dropped
    assert logical_to_spec(("embed", "mlp"), (8, 8), FakeMesh(data=8, fsdp=1, tensor=1), None) == P(None, None)


def test_make_mesh_single_device():
    from jaxpref.sharding import make_mesh

    mesh = make_mesh(None)
    assert mesh.axis_names == ("data", "fsdp", "tensor")
    assert int(np.prod(list(mesh.shape.values()))) == jax.device_count()
