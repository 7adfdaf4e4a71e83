"""The model and optimizer a run trains, and the one thing that changes them mid-run: the
switch from stage 2 (embeddings and LM head only) to stage 3 (everything)."""
from __future__ import annotations

from dataclasses import dataclass

from megatron_normistral.training.stages import set_trainable


@dataclass
class TrainModel:
    """This rank's model chunks (wrapped for DDP) and their optimizer."""

    chunks: list
    optimizer: object

    @classmethod
    def build(cls, recipe, trainable: str) -> "TrainModel":
        """Build the chunks of this rank's pipeline stage, load the pretrained weights (if the
        recipe names them), freeze what ``trainable`` does not train, wrap, make the optimizer."""
        from megatron_normistral.model.provider import build_model

        chunks = build_model(recipe.model, recipe.parallel, recipe.precision, recipe.training.seq_length)
        if recipe.checkpoint.pretrained:
            from megatron_normistral.checkpoint.weights import load_model_weights

            load_model_weights(chunks, recipe.checkpoint.pretrained)
        return cls._wrapped(recipe, chunks, trainable)

    @classmethod
    def _wrapped(cls, recipe, bare_chunks, trainable: str) -> "TrainModel":
        from megatron_normistral.training.ddp import wrap_model
        from megatron_normistral.training.optimizer import build_optimizer

        # Before wrapping: frozen weights get no gradient buffers and no optimizer state.
        set_trainable(bare_chunks, trainable, family=recipe.model.architecture().family)
        chunks = wrap_model(bare_chunks, recipe.parallel, recipe.precision, recipe.ddp)
        chunks[0].config.calculate_per_token_loss = recipe.training.loss_weighting == "token"
        return cls(chunks, build_optimizer(chunks, recipe.optimizer, recipe.parallel, recipe.precision))

    def rewrapped(self, recipe, trainable: str) -> "TrainModel":
        """The same weights, re-wrapped for ``trainable``, with a new optimizer (fresh Adam
        moments, as at the start of a stage)."""
        from megatron_normistral.model.sharding import unwrap_model
        from megatron_normistral.training.ddp import sync_params

        sync_params(self.chunks)  # the last step's parameter all-gather, if overlapped, before re-wrapping
        return self._wrapped(recipe, [unwrap_model(c) for c in self.chunks], trainable)


class StageSwitch:
    """Stage 2 -> 3 within one run, at ``stage.switch_to_full_at`` (recipe ``stage``)."""

    def __init__(self, switch_to_full_at: int | None, log):
        self.at = switch_to_full_at
        self.log = log

    def before_step(self, state, model: TrainModel, recipe) -> TrainModel:
        if state.trainable != "embeddings" or self.at is None or state.step < self.at:
            return model
        state.trainable = "full"
        self.log(f"step {state.step}: switched from embeddings-only to full training")
        return model.rewrapped(recipe, "full")
