"""Subprocess body of test_sampler_mesh.py: ``generate`` on simulated CPU meshes and across processes.

``python -m tests.generation.mesh_worker CASE OUT.json [MODEL_DIR]`` with the device count set by
``XLA_FLAGS=--xla_force_host_platform_device_count=N`` (fixed when JAX starts):

* ``meshes`` (8 devices): greedy and sampled tokens of a tiny transformers Llama on one device and on
  every mesh of ``MESHES``, and the all-gathers of the compiled program (``weight_gathers``) on the
  tensor meshes, with weights as placed and with weights forced whole inside the program (the control);
* ``kd`` (4 devices): a short on-policy KD run (``jaxpref.train.run``) on the mesh {data: 2, tensor: 2};
* ``processes`` (2 devices per process, ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` /
  ``JAX_PROCESS_ID`` set): each process generates its own prompts on a mesh over both processes.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import sys
from functools import partial
from pathlib import Path

import jax
import numpy as np

MESHES = ({"data": 8}, {"data": 2, "tensor": 4}, {"fsdp": 2, "tensor": 4}, {"data": 2, "fsdp": 2, "tensor": 2})
# Sizes every mesh axis above divides (heads 12, KV heads 4, MLP 88, vocabulary 128 over tensor; hidden 48
# over fsdp), chosen so that no activation of the program has as many elements as a weight.
MODEL = dict(
    vocab_size=128, hidden_size=48, intermediate_size=88, num_attention_heads=12, num_key_value_heads=4, head_dim=6
)
NEW = 12
PROMPT_LENGTHS = (5, 11, 3, 20, 7)


def prompts(lengths=PROMPT_LENGTHS, seed: int = 0) -> list[list[int]]:
    from tests.models.tiny import random_ids

    return [random_ids((n,), vocab=MODEL["vocab_size"], seed=seed + n).tolist() for n in lengths]


# ------------------------------------------------------------------------------ HLO inspection

_GATHER = re.compile(r"= (\(?[^=]*?\)?) all-gather(?:-start)?\(")
_ARRAY = re.compile(r"(\w+)\[([\d,]*)\]")


def all_gathers(hlo: str) -> list[tuple[str, tuple[int, ...]]]:
    """(dtype, result shape) of every all-gather in compiled HLO text (async starts: their results)."""
    out = []
    for line in hlo.splitlines():
        m = _GATHER.search(line)
        if m:
            arrays = _ARRAY.findall(m.group(1))
            dtype, dims = arrays[-1]  # all-gather-start's tuple ends with the gathered result
            out.append((dtype, tuple(int(d) for d in dims.split(",") if d)))
    return out


def _merges(shape: tuple[int, ...]) -> set[tuple[int, ...]]:
    """``shape`` with any runs of adjacent dimensions merged (the reshapes a weight goes through)."""
    if len(shape) <= 1:
        return {shape}
    out = set()
    for rest in _merges(shape[1:]):
        out.add((shape[0], *rest))
        out.add((shape[0] * rest[0], *rest[1:]))
    return out


def _forms(shape: tuple[int, ...], layered: bool) -> set[tuple[int, ...]]:
    """How an array of ``shape`` can look in the program: one layer's slice (``layered``) or the whole,
    adjacent dimensions merged, in any order, size-1 dimensions dropped."""
    out = set()
    for whole in (shape, shape[1:]) if layered else (shape,):
        for merged in _merges(whole):
            out.update(tuple(d for d in order if d != 1) for order in itertools.permutations(merged))
    return out


def tensor_weight_shapes(state, mesh) -> dict[tuple[int, ...], list[str]]:
    """Shape -> weights, for every weight split over ``tensor`` as it looks gathered along ``tensor``
    (its ``tensor`` dimensions whole, the others whole or still split: ``_forms``). Shapes that another
    weight's legitimate gathers also take (its ``tensor`` dimensions still split) are left out."""
    forbidden: dict[tuple[int, ...], list[str]] = {}
    allowed: set[tuple[int, ...]] = set()
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        spec = tuple(getattr(leaf.sharding, "spec", ())) + (None,) * leaf.ndim
        entries = [() if e is None else (e,) if isinstance(e, str) else tuple(e) for e in spec[: leaf.ndim]]
        name = jax.tree_util.keystr(path).replace(".value", "")
        split = [n // math.prod(mesh.shape[a] for a in e) for n, e in zip(leaf.shape, entries)]
        whole_or_split = [sorted({n, k}) for n, k in zip(leaf.shape, split)]
        tensor_whole = [[n] if "tensor" in e else sizes for n, e, sizes in zip(leaf.shape, entries, whole_or_split)]
        tensor_split = [[k] if "tensor" in e else sizes for k, e, sizes in zip(split, entries, whole_or_split)]
        for sizes in itertools.product(*tensor_split):
            allowed |= _forms(sizes, "layers" in name)
        if any("tensor" in e for e in entries):
            for sizes in itertools.product(*tensor_whole):
                for form in _forms(sizes, "layers" in name):
                    forbidden.setdefault(form, []).append(name)
    return {shape: sorted(set(names)) for shape, names in forbidden.items() if shape not in allowed}


def weight_gathers(hlo: str, shapes: dict[tuple[int, ...], list[str]]) -> list[str]:
    """The all-gathers whose result looks like a weight gathered along ``tensor`` (``tensor_weight_shapes``)."""
    found = []
    for dtype, shape in all_gathers(hlo):
        squeezed = tuple(d for d in shape if d != 1)
        if dtype == "f32" and squeezed in shapes:
            found.append(f"{dtype}{list(shape)}: {' or '.join(shapes[squeezed])}")
    return found


def compiled_program(model, mesh, *, whole_weights: bool = False, xla_lookup: bool = False):
    """``_generate_group`` for ``PROMPT_LENGTHS``' rows (padded) of 64-token prompts on ``mesh``, greedy
    (the program ``meshes`` ran), compiled: (HLO text, memory analysis).

    ``whole_weights``: the control, every weight constrained to be replicated inside; ``xla_lookup``:
    embeddings looked up by the model's ``jnp.take`` (XLA partitions it) instead of ``placement.embed``.
    """
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec

    from jaxpref import platform
    from jaxpref.generation import placement, sampler

    graphdef, state = nnx.split(model)
    rows = lambda a: placement.global_array(a, NamedSharding(mesh, placement.batch_spec(a.ndim)))  # noqa: E731
    whole = NamedSharding(mesh, PartitionSpec())
    batch = placement.padded_rows(len(PROMPT_LENGTHS), mesh)
    args = [
        rows(np.zeros((batch, 64), np.int32)),
        rows(np.ones(batch, np.int32)),
        rows(np.ones(batch, bool)),
        placement.replicated_key(jax.random.key(0), mesh),
    ]
    args += [placement.global_array(np.asarray(a), whole) for a in (np.float32(1), np.int32(0), np.float32(1), [-1])]
    split_vocab = placement.vocab_split(model.embed_tokens.table()) and not xla_lookup
    static = dict(max_new_tokens=NEW, mode=(True, False, False), use_adapters=True, mesh=mesh, split_vocab=split_vocab)

    @partial(jax.jit, static_argnums=0)
    def control(graphdef, state, *args):
        state = jax.lax.with_sharding_constraint(state, jax.tree.map(lambda _: whole, state))
        return sampler._generate_group.__wrapped__(graphdef, state, *args, **static)

    with platform.kernel_mesh(mesh):
        if whole_weights:
            lowered = control.lower(graphdef, state, *args)
        else:
            lowered = sampler._generate_group.lower(graphdef, state, *args, **static)
        compiled = lowered.compile()
    return compiled.as_text(), compiled.memory_analysis()


# ------------------------------------------------------------------------------------ cases


def _model(model_dir: str, mesh=None):
    from jaxpref import sharding as shd
    from jaxpref.models import from_pretrained

    model = from_pretrained(model_dir)
    if mesh is not None:
        shd.shard_module(model, mesh)
    return model


def meshes(model_dir: str) -> dict:
    from flax import nnx

    from jaxpref import sharding as shd
    from jaxpref.generation import SamplingSettings, generate
    from tests.models.tiny import build_hf

    build_hf("llama", seed=5, **MODEL).save_pretrained(model_dir)
    ps = prompts()
    greedy = SamplingSettings(max_new_tokens=NEW)
    sampled = SamplingSettings(max_new_tokens=NEW, temperature=1.0, top_k=40)
    key = jax.random.key(7)
    one = _model(model_dir)
    res = {"one": {"greedy": generate(one, ps, greedy).tokens, "sampled": generate(one, ps, sampled, key=key).tokens}}
    for sizes in MESHES:
        mesh = shd.make_mesh(sizes)
        model = _model(model_dir, mesh)
        entry = {"greedy": generate(model, ps, greedy, mesh=mesh).tokens}
        entry["sampled"] = [generate(model, ps, sampled, key=key, mesh=mesh).tokens for _ in range(2)]
        if mesh.shape["fsdp"] > 1 and mesh.shape["data"] > 1:  # two groups of 3 rows, each padded to 4
            entry["groups"] = generate(model, ps, greedy, mesh=mesh, batch_size=3).tokens
        if mesh.shape["tensor"] > 1:
            shapes = tensor_weight_shapes(nnx.split(model)[1], mesh)
            entry["tensor_weights"] = sorted({n for names in shapes.values() for n in names})
            hlo, memory = compiled_program(model, mesh)
            entry["weight_gathers"] = weight_gathers(hlo, shapes)
            entry["all_gathers"] = [f"{d}{list(s)}" for d, s in all_gathers(hlo)]
            # per-device KV cache blocks [layers, rows, 64 + NEW slots, kv heads, head_dim] in the program
            entry["cache_blocks"] = sorted(set(re.findall(rf"f32\[2,\d+,{64 + NEW},\d+,6\]", hlo)))
            entry["temp_bytes"] = memory.temp_size_in_bytes
            hlo, memory = compiled_program(model, mesh, whole_weights=True)
            entry["control_weight_gathers"] = weight_gathers(hlo, shapes)
            entry["control_weights_found"] = sorted(
                {n for g in entry["control_weight_gathers"] for n in g.split(": ")[1].split(" or ")}
            )
            entry["control_temp_bytes"] = memory.temp_size_in_bytes
            if mesh.shape["fsdp"] > 1 and mesh.shape["data"] > 1:
                entry["xla_lookup_weight_gathers"] = weight_gathers(
                    compiled_program(model, mesh, xla_lookup=True)[0], shapes
                )
            entry["weight_shards"] = {
                jax.tree_util.keystr(p): list(x.sharding.shard_shape(x.shape))
                for p, x in jax.tree_util.tree_flatten_with_path(nnx.split(model)[1])[0]
                if "q_proj" in jax.tree_util.keystr(p) or "lm_head" in jax.tree_util.keystr(p)
            }
        res[json.dumps(sizes)] = entry
    return res


def kd(out_dir: str, *overrides: str) -> dict:
    """A short on-policy KD run on {data: 2, tensor: 2} (tests/generation/test_sampler_mesh.py's config)."""
    from jaxpref.train import run
    from tests.generation.test_sampler_mesh import kd_config

    result = run(kd_config(out_dir, "mesh.data=2", "mesh.tensor=2", *overrides), show_progress=False)
    return {"steps": result["steps"], "train": result["train"]}


def processes(model_dir: str) -> dict:
    """Each process passes its own prompts on a mesh over both processes (data across them, tensor
    within); the reference is ``generate`` on this process's first device alone."""
    from jaxpref import distributed
    from jaxpref import sharding as shd
    from jaxpref.generation import SamplingSettings, generate

    distributed.initialize()
    me = jax.process_index()
    mesh = shd.make_mesh({"data": 2, "tensor": 2})
    local = _model(model_dir)  # on this process's first device
    sharded = _model(model_dir, mesh)
    greedy = SamplingSettings(max_new_tokens=NEW)
    sampled = SamplingSettings(max_new_tokens=NEW, temperature=1.0)
    key = jax.random.key(11)
    res: dict = {"process": me, "devices": [jax.local_device_count(), jax.device_count()]}
    # unequal counts: process 0 has 2 prompts, process 1 has 5 (rows per process: the most, 5)
    mine = prompts((4, 9) if me == 0 else (6, 13, 2, 30, 8), seed=100 * me)
    # batch_size 2: three groups of 2 rows per process (process 0 only fills the first)
    res["greedy"] = generate(sharded, mine, greedy, mesh=mesh, batch_size=2).tokens
    res["greedy_reference"] = generate(local, mine, greedy).tokens
    # sampling: 3 prompts each, so the global group is both processes' prompts in process order, which
    # one device samples alike (rows don't depend on the padding rows after them)
    both = [prompts((3, 7, 12), seed=0), prompts((5, 9, 2), seed=50)]
    res["sampled"] = generate(sharded, both[me], sampled, key=key, mesh=mesh).tokens
    res["sampled_reference"] = generate(local, both[0] + both[1], sampled, key=key).tokens[3 * me : 3 * me + 3]
    res["empty"] = generate(sharded, [] if me == 0 else mine[:1], greedy, mesh=mesh, batch_size=2).tokens
    jax.distributed.shutdown()
    return res


if __name__ == "__main__":
    case, out = sys.argv[1], Path(sys.argv[2])
    fn = {"meshes": meshes, "kd": kd, "processes": processes}[case]
    result = fn(*sys.argv[3:])
    suffix = f".{result['process']}" if case == "processes" else ""
    out.with_name(out.name + suffix).write_text(json.dumps(result))
