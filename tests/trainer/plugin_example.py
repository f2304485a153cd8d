"""A user objective plugged in by import path (``objective: tests.trainer.plugin_example:build``)."""

import jax.numpy as jnp

from jaxpref.objectives import Objective, get_objective_builder


def build(cfg):
    sft = get_objective_builder("sft")(cfg)

    def loss(model, batch, num_items, *, train):
        value, metrics = sft.loss(model, batch, num_items, train=train)
        # a label-smoothing-free "z-loss"-like extra metric, just to prove the plugin ran
        return value, {**metrics, "plugin_tokens": jnp.sum(batch["loss_mask"]) / num_items}

    return Objective(name="plugin", count=sft.count, loss=loss)
