"""Train NorMistral with megatron-core (stage 2: embeddings only; stage 3: full).

    torchrun --nproc-per-node N pretrain_normistral.py --config RECIPE.yaml [--flag value ...]

Run with --help for every setting. A plain `python pretrain_normistral.py ...` runs as one
process. Exit codes: 0 done (or stopped by a signal / the wall-time limit after saving),
2 bad settings or inputs (one line on stderr, nothing started), 3 stopped by non-finite steps.
"""
import sys

if __name__ == "__main__":
    # First, before torch is imported (seconds) and the model is built (minutes): a SIGTERM or
    # SLURM's SIGUSR1 during start-up is remembered and stops the run at its first step
    # instead of killing the process with nothing saved.
    from megatron_normistral.runtime.stop import capture_early

    capture_early()


def main(argv=None) -> int:
    import os

    from megatron_normistral.config.recipe import RecipeError, parse_recipe, validate_recipe

    try:
        recipe, args = parse_recipe(argv)
        if args.print_config:
            import yaml

            # Without a launcher there is no world size: what depends on it is not checked.
            world = os.environ.get("WORLD_SIZE")
            validate_recipe(recipe, int(world) if world else None)
            print(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
            return 0
    except RecipeError as exc:
        print(f"pretrain_normistral.py: error: {exc}", file=sys.stderr)
        return 2
    from megatron_normistral.runtime.parallel import shutdown
    from megatron_normistral.checkpoint import CheckpointError
    from megatron_normistral.pretrain import pretrain
    from megatron_normistral.training.monitors import TrainingStopped

    try:
        pretrain(recipe)
    except (RecipeError, CheckpointError) as exc:
        print(f"pretrain_normistral.py: error: {exc}", file=sys.stderr)
        shutdown()
        return 2
    except TrainingStopped as exc:
        print(f"pretrain_normistral.py: {exc}", file=sys.stderr)
        shutdown()
        return 3
    shutdown()
    return 0


if __name__ == "__main__":  # the guard matters: dist_checkpointing's writer spawns processes
    sys.exit(main())
