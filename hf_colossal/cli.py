"""``hf-colossal``: run recipes and inspect the optimizer registry.

    hf-colossal train [RECIPE] [section.field=value ...]   run a recipe (default: the default recipe)
    hf-colossal optimizers [NAME]                          the optimizer table, or NAME's optim_args keys
    hf-colossal recipes                                    the built-in recipes

Under several processes: ``accelerate launch -m hf_colossal train RECIPE`` (or ``torchrun -m hf_colossal ...``).
"""

from __future__ import annotations

import argparse
import sys

DEFAULT_RECIPE = "minilm_bbc_lamb"


def _train(ns: argparse.Namespace) -> int:
    from .recipes.runner import run_recipe
    from .recipes.schema import load_recipe

    if "=" in ns.recipe:  # `hf-colossal train key=value`: overrides of the default recipe
        ns.overrides.insert(0, ns.recipe)
        ns.recipe = DEFAULT_RECIPE
    recipe = load_recipe(ns.recipe, ns.overrides)
    metrics = run_recipe(recipe)
    width = max(map(len, metrics))
    for key, value in metrics.items():
        print(f"{key.ljust(width)}  {value:.4f}" if isinstance(value, float) else f"{key.ljust(width)}  {value}")
    return 0


def _optimizers(ns: argparse.Namespace) -> int:
    from .registry import get_optimizer_spec, list_optimizers

    if ns.name:
        spec = get_optimizer_spec(ns.name)
        print(f"{spec.name}: {spec.summary} ({spec.reference})")
        print(f"TrainingArguments it uses: {', '.join(spec.hyperparameters)}")
        print(spec.config_cls.describe())
    else:
        list_optimizers()
    return 0


def _recipes(ns: argparse.Namespace) -> int:
    from .recipes.schema import available_recipes

    for name, path in available_recipes().items():
        print(f"{name}{'  (default)' if name == DEFAULT_RECIPE else ''}  {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-colossal", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="run a recipe")
    train.add_argument("recipe", nargs="?", default=DEFAULT_RECIPE, help="a YAML file or a built-in recipe name")
    train.add_argument("overrides", nargs="*", help="section.field=value, e.g. training.learning_rate=1e-3")
    train.set_defaults(run=_train)
    optimizers = commands.add_parser("optimizers", help="list the registered optimizers")
    optimizers.add_argument("name", nargs="?", help="show this optimizer's optim_args keys")
    optimizers.set_defaults(run=_optimizers)
    recipes = commands.add_parser("recipes", help="list the built-in recipes")
    recipes.set_defaults(run=_recipes)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .config import OptionsError
    from .recipes.data import MissingEmbeddedPackage
    from .recipes.schema import RecipeError

    ns = build_parser().parse_args(argv)
    try:
        return ns.run(ns)
    except (RecipeError, OptionsError, MissingEmbeddedPackage) as err:
        print(f"hf-colossal: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
