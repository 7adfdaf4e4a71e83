"""Train NorMistral with megatron-core (stage 2: embeddings only; stage 3: full).

    torchrun --nproc-per-node N pretrain_normistral.py --config RECIPE.yaml [--flag value ...]

Run with --help for every setting. A plain `python pretrain_normistral.py ...` runs as one
process.
"""
import sys


def main(argv=None) -> int:
    from megatron_normistral.config.recipe import RecipeError, parse_recipe, validate_recipe

    try:
        recipe, args = parse_recipe(argv)
        if args.print_config:
            import os

            import yaml

            validate_recipe(recipe, int(os.environ.get("WORLD_SIZE", "1")))
            print(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
            return 0
    except RecipeError as exc:
        print(f"pretrain_normistral.py: error: {exc}", file=sys.stderr)
        return 2
    from megatron_normistral.runtime.parallel import shutdown
    from megatron_normistral.training.loop import TrainingStopped, pretrain

    try:
        pretrain(recipe)
    except RecipeError as exc:
        print(f"pretrain_normistral.py: error: {exc}", file=sys.stderr)
        return 2
    except TrainingStopped as exc:
        print(f"pretrain_normistral.py: {exc}", file=sys.stderr)
        shutdown()
        return 3
    shutdown()
    return 0


if __name__ == "__main__":  # the guard matters: dist_checkpointing's writer spawns processes
    sys.exit(main())
