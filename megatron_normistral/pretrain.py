"""Train as a recipe says: :func:`pretrain`.

The one module that knows both the recipe (``config/``, which composes the sections of every
component) and the training (``training/``, which knows nothing of ``config/``); above both, as
``pretrain_normistral.py`` (the command line) is above it.
"""
from __future__ import annotations

import os

from megatron_normistral.checkpoint import resume as ckpt
from megatron_normistral.config.recipe import Recipe, validate_recipe
from megatron_normistral.runtime import parallel as rt
from megatron_normistral.runtime.collectives import any_true, min_float, world
from megatron_normistral.runtime.stop import StopRequest, process_start_time
from megatron_normistral.training.loop import ForwardSteps, Trainer


def pretrain(recipe: Recipe, forward_steps: ForwardSteps | None = None) -> ckpt.TrainState:
    """Train as the recipe says; returns the final train state. Raises RecipeError (settings,
    inputs), CheckpointError (a checkpoint that cannot be resumed) or TrainingStopped."""
    from megatron_normistral.training.preflight import preflight

    started_at = process_start_time()  # the wall-time limit counts from here, not from step 1
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    validate_recipe(recipe, world_size)  # before any process group work
    preflight(recipe, world_size)  # files, vocabulary, checkpoints: one-line errors
    stop = StopRequest(recipe.checkpoint.exit_signals, recipe.checkpoint.exit_duration_in_mins, started_at,
                       agree=lambda flag: any_true(flag, world()))
    with stop:  # our signal handlers from here on, the previous ones restored on the way out
        if recipe.checkpoint.save:
            ckpt.start_writer_immune_to(recipe.checkpoint.exit_signals)
        rt.init_distributed()
        # One clock for all ranks (the earliest start), so they reach the limit at the same step.
        stop.restart_clock(min_float(started_at, world()))
        rt.init_model_parallel(recipe.parallel)
        rt.set_seed(recipe.training.seed)
        return Trainer.build(recipe, stop, forward_steps).fit()
