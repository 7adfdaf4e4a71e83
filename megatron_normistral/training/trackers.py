"""Weights & Biases as an optional experiment tracker (--wandb-project): the scalars
:class:`~.metrics.MetricsLogger` writes to TensorBoard, under the same names (``train/loss``,
``eval/<language>/<key>``) with the training step as W&B's step, and the resolved recipe as the
run's config. Only global rank 0 starts a run. ``wandb`` is imported when a run is started,
never by importing this module: a recipe without --wandb-project does not need the package.

A resumed run continues the same W&B run. Its id is kept in a small file beside the training
checkpoints (``<checkpoint.save>/wandb_run_id.txt``) and read back from ``checkpoint.load``
only when the training state was resumed from there: W&B's run then follows the checkpoints.
A fresh start (no checkpoint to resume, even in a reused folder) is a new W&B run. (An id file
in the W&B folder, reused whenever present, would append a restart from scratch to the old
run.) The steps a crashed run logged after its last checkpoint come again after the resume;
W&B ignores, with a warning, steps below the last one the run already has.
"""
from __future__ import annotations

from pathlib import Path

from megatron_normistral.runtime.logs import get_logger
from megatron_normistral.training.metrics import LoggingConfig

log = get_logger(__name__)

__all__ = ["RUN_ID_FILE", "WandbWriter", "run_id_to_continue", "wandb_dir"]

RUN_ID_FILE = "wandb_run_id.txt"


def wandb_dir(logging: LoggingConfig, checkpoint_save: str | None) -> str | None:
    """Where the W&B run files go: --wandb-save-dir, else the folder wandb in --save (as
    Megatron-LM does), else None (W&B's own default)."""
    if logging.wandb_save_dir:
        return logging.wandb_save_dir
    return str(Path(checkpoint_save) / "wandb") if checkpoint_save else None


def run_id_to_continue(checkpoint_load: str | None, resumed: bool) -> str | None:
    """The W&B run id stored with the checkpoints this run resumed from; None for a fresh
    start or when those checkpoints were written without W&B."""
    if not resumed or not checkpoint_load:
        return None
    path = Path(checkpoint_load) / RUN_ID_FILE
    if not path.is_file():
        return None
    return path.read_text().strip() or None


class WandbWriter:
    """Scalars of one W&B run; :meth:`start` makes one."""

    def __init__(self, run):
        self.run = run

    @classmethod
    def start(cls, logging: LoggingConfig, config: dict, checkpoint_save: str | None, checkpoint_load: str | None,
              resumed: bool) -> "WandbWriter":
        """Start (or, when ``resumed`` from checkpoints that name one, continue) the W&B run of
        ``logging.wandb_project``, with ``config`` (the resolved recipe) as its config."""
        import wandb

        directory = wandb_dir(logging, checkpoint_save)
        if directory:
            Path(directory).mkdir(parents=True, exist_ok=True)  # W&B wants it to exist
        run_id = run_id_to_continue(checkpoint_load, resumed)
        # resume="allow": the stored id continues its run; a new id (run_id None: W&B makes one)
        # starts a new run, so the same call serves both.
        run = wandb.init(project=logging.wandb_project, name=logging.wandb_exp_name, dir=directory, config=config,
                         id=run_id, resume="allow")
        if checkpoint_save:
            Path(checkpoint_save).mkdir(parents=True, exist_ok=True)
            (Path(checkpoint_save) / RUN_ID_FILE).write_text(run.id + "\n")
        log.info(f"W&B run {run.id} ({'continued' if run_id else 'new'}) of project {logging.wandb_project}"
                 + (f", files in {directory}" if directory else ""))
        return cls(run)

    def log(self, scalars: dict[str, float], step: int) -> None:
        if scalars:
            self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()
