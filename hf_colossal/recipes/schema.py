"""The recipe file: a YAML document that names a model, data, a task and TrainingArguments.

```yaml
task: sequence_classification        # or causal_lm, image_classification
model:
  embedded: minilm                   # a model shipped in a package, or
  # name_or_path: bert-base-uncased  # a hub name / local folder (online users), or
  # from_config: {model_type: llama, hidden_size: 128, ...}   # a fresh model (causal_lm)
data:
  embedded: bbc_news                 # bbc_news | kjv | digits, or local files / a hub dataset:
  # train_file: train.jsonl  eval_file: eval.jsonl   |   hub_dataset: ag_news  eval_split: test
  options: {eval_size: 445}
  max_length: 64                     # truncation (classification) or block size (causal_lm)
training:                            # any TrainingArguments field
  optim: lamb
  learning_rate: 2.0e-3
callbacks: []                        # filled by later features
plugins: []
```
Every error names the file, the field and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from pathlib import Path
from typing import Any

import yaml

from ..callbacks import LayerStatsCallback, LRScalingCallback, WarmupCallback
from ..comm.plugin import GradientCompressionPlugin
from ..memory.plugin import HeterogeneousMemoryPlugin

TASKS = ("sequence_classification", "causal_lm", "image_classification")


class RecipeError(ValueError):
    """A recipe that cannot run; the message names the file and the field."""


@dataclasses.dataclass
class ModelSection:
    embedded: str | None = None
    name_or_path: str | None = None
    from_config: dict[str, Any] | None = None
    tokenizer: str | None = None
    bpe_vocab_size: int = 4096
    ghost_batch_size: int | None = None  # replace BatchNorm layers by ghost batch norm (Hoffer et al. 2017)
    # dtype pretrained weights load in: float32 keeps fp32 master weights under --bf16 / --fp16 (transformers
    # would otherwise keep a half-precision checkpoint in half precision); "auto" keeps the checkpoint's dtype
    dtype: str = "float32"


@dataclasses.dataclass
class DataSection:
    embedded: str | None = None
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    train_file: str | None = None
    eval_file: str | None = None
    hub_dataset: str | None = None
    hub_config: str | None = None
    train_split: str = "train"
    eval_split: str = "validation"
    text_column: str = "text"
    label_column: str = "label"
    max_length: int = 128


@dataclasses.dataclass
class Recipe:
    task: str  # one of TASKS
    model: ModelSection
    data: DataSection
    training: dict[str, Any]
    callbacks: list[Any] = dataclasses.field(default_factory=list)
    plugins: list[Any] = dataclasses.field(default_factory=list)
    source: str = "<recipe>"

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data.pop("source")
        return data


#: What the ``callbacks:`` and ``plugins:`` slots accept, by name. An entry is the name alone or a mapping with
#: ``name`` and the constructor's keyword arguments, e.g. ``{name: lr_scaling, reference_batch_size: 32}``.
RECIPE_CALLBACKS: dict[str, type] = {
    "lr_scaling": LRScalingCallback, "warmup": WarmupCallback, "layer_stats": LayerStatsCallback,
}
RECIPE_PLUGINS: dict[str, type] = {
    "gradient_compression": GradientCompressionPlugin, "heterogeneous_memory": HeterogeneousMemoryPlugin,
}

#: Entries users ask for that are refused on purpose, with the reason.
REFUSED_ENTRIES: dict[str, str] = {
    "batch_ramp": (
        "a batch-size ramp (Smith et al. 2018) is not offered: Trainer computes the optimizer steps per epoch once "
        "from len(train_dataloader) // gradient_accumulation_steps and resumes by global_step modulo that number, "
        "so a batch that grows mid-run (a growing sampler or accumulation) misaligns epochs, max_steps and "
        "checkpoint resume. The same effect per Smith et al.: keep the batch and decay the learning rate by the "
        "factor the batch would have grown (training.lr_scheduler_type), or train in stages, one run per batch size"
    ),
}


def _fail(source: str, field: str, message: str) -> RecipeError:
    return RecipeError(f"{source}: field '{field}': {message}")


def _section(cls: type, raw: Any, source: str, prefix: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise _fail(source, prefix, f"must be a mapping, got {type(raw).__name__}")
    allowed = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if key not in allowed:
            raise _fail(source, f"{prefix}.{key}", f"unknown field; allowed: {', '.join(allowed)}")
    return cls(**raw)


def _check_training(training: Any, source: str) -> dict[str, Any]:
    from transformers import TrainingArguments

    if training is None:
        return {}
    if not isinstance(training, dict):
        raise _fail(source, "training", "must be a mapping of TrainingArguments fields")
    fields = {f.name: f for f in dataclasses.fields(TrainingArguments) if f.init}
    checked = dict(training)
    for key, value in training.items():
        if key not in fields:
            close = difflib.get_close_matches(key, sorted(fields), n=3)
            hint = f"did you mean {', '.join(close)}?" if close else "see transformers.TrainingArguments"
            raise _fail(source, f"training.{key}", f"not a TrainingArguments field; {hint}")
        if isinstance(value, str) and _accepts_float(fields[key].type) and not _accepts_str(fields[key].type):
            # YAML 1.1 reads 5e-5 (no dot) as a string; TrainingArguments would pass it on unconverted
            try:
                checked[key] = float(value)
            except ValueError:
                raise _fail(source, f"training.{key}", f"expected a number, got {value!r}") from None
    return checked


def _type_args(annotation: Any) -> tuple[Any, ...]:
    return typing.get_args(annotation) or (annotation,)


def _accepts_float(annotation: Any) -> bool:
    return float in _type_args(annotation)


def _accepts_str(annotation: Any) -> bool:
    return str in _type_args(annotation)


def build_slot_entry(entry: Any, registry: dict[str, type], source: str, field: str) -> Any:
    """Construct one ``callbacks:`` / ``plugins:`` entry; errors name the file, the field and the choices."""
    options = {"name": entry} if isinstance(entry, str) else dict(entry or {})
    name = options.pop("name", None)
    if name in REFUSED_ENTRIES:
        raise _fail(source, field, f"{name}: {REFUSED_ENTRIES[name]}")
    if name not in registry:
        raise _fail(source, field, f"unknown entry {name!r}; allowed: {', '.join(sorted(registry)) or 'none yet'}")
    try:
        return registry[name](**options)
    except (TypeError, ValueError) as err:
        raise _fail(source, f"{field}.{name}", str(err)) from None


def _check_slot(values: Any, registry: dict[str, type], source: str, field: str) -> list[Any]:
    if values is None:
        return []
    if not isinstance(values, list):
        raise _fail(source, field, "must be a list")
    for value in values:
        build_slot_entry(value, registry, source, field)
    return values


def recipe_from_dict(raw: Any, source: str = "<recipe>") -> Recipe:
    if not isinstance(raw, dict):
        raise RecipeError(f"{source}: a recipe must be a YAML mapping with task, model, data, training")
    allowed = [f.name for f in dataclasses.fields(Recipe) if f.name != "source"]
    for key in raw:
        if key not in allowed:
            raise _fail(source, key, f"unknown top-level field; allowed: {', '.join(allowed)}")
    task = raw.get("task")
    if task not in TASKS:
        raise _fail(source, "task", f"{task!r} is not a task; allowed: {', '.join(TASKS)}")
    model = _section(ModelSection, raw.get("model"), source, "model")
    given = [k for k in ("embedded", "name_or_path", "from_config") if getattr(model, k) is not None]
    if len(given) != 1:
        raise _fail(source, "model", f"set exactly one of embedded, name_or_path, from_config (got {given or 'none'})")
    if model.from_config is not None and task == "sequence_classification":
        raise _fail(source, "model.from_config", "a model from config is supported for causal_lm and "
                    "image_classification; use embedded or name_or_path for sequence_classification")
    if task == "image_classification" and model.from_config is None:
        raise _fail(source, "model", "image_classification builds its model from_config (model_type: small_cnn)")
    data = _section(DataSection, raw.get("data"), source, "data")
    given = [k for k in ("embedded", "train_file", "hub_dataset") if getattr(data, k) is not None]
    if len(given) != 1:
        raise _fail(source, "data", f"set exactly one of embedded, train_file, hub_dataset (got {given or 'none'})")
    return Recipe(
        task=task,
        model=model,
        data=data,
        training=_check_training(raw.get("training"), source),
        callbacks=_check_slot(raw.get("callbacks"), RECIPE_CALLBACKS, source, "callbacks"),
        plugins=_check_slot(raw.get("plugins"), RECIPE_PLUGINS, source, "plugins"),
        source=source,
    )


def apply_overrides(raw: dict[str, Any], overrides: list[str], source: str) -> dict[str, Any]:
    """``training.learning_rate=1e-3`` style overrides; values are parsed as YAML scalars."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise RecipeError(f"{source}: override {item!r} is not of the form section.field=value")
        target = raw
        parts = key.split(".")
        for part in parts[:-1]:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise _fail(source, key, "cannot set a field inside a non-mapping value")
        target[parts[-1]] = yaml.safe_load(text)
    return raw


def builtin_recipe_dirs() -> list[Path]:
    """Where recipe names (without a path) are looked up: the wheel's copy, then a source checkout's."""
    package_dir = Path(__file__).resolve().parent
    return [package_dir / "builtin", package_dir.parent.parent / "recipes"]


def available_recipes() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for directory in reversed(builtin_recipe_dirs()):
        for path in sorted(directory.glob("*.yaml")):
            found[path.stem] = path
    return found


def load_recipe(path_or_name: str, overrides: list[str] | None = None) -> Recipe:
    path = Path(path_or_name)
    if not path.exists():
        recipes = available_recipes()
        if path_or_name not in recipes:
            raise RecipeError(
                f"recipe {path_or_name!r} is neither a file nor a built-in recipe; built-in: {', '.join(recipes)}"
            )
        path = recipes[path_or_name]
    source = str(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise RecipeError(f"{source}: not valid YAML: {err}") from None
    raw = apply_overrides(raw or {}, overrides or [], source)
    return recipe_from_dict(raw, source)
