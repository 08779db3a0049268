"""Run a recipe with the stock Trainer and leave a finished run's record in its output folder.

The output folder holds ``recipe.yaml`` (the resolved recipe, written first), ``status.json`` (``running``,
then ``completed`` or ``failed`` with the error), and — only once the run has completed — ``metrics.json``
(final metrics, run time, the Trainer's log history) and ``plot.png`` (train / eval loss and learning rate
over steps). Stale ``metrics.json`` / ``plot.png`` from an earlier run are removed when a run starts, so they
never describe a run that did not finish.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from ..nn import apply_ghost_batch_norm

from .data import load_embedded_dataset, minilm_model_path, train_bpe_tokenizer, unigram_cross_entropy
from .models import IMAGE_MODELS
from .schema import RECIPE_CALLBACKS, RECIPE_PLUGINS, Recipe, RecipeError, build_slot_entry

logger = logging.getLogger(__name__)

#: Models that arrive through packages (offline), by recipe name.
EMBEDDED_MODELS: dict[str, Callable[[], str]] = {"minilm": minilm_model_path}

FINISHED_FILES = ("metrics.json", "plot.png")


def _plugin_trainer(plugin: Any) -> tuple[str, Callable[[type], type]]:
    """The Trainer keyword a recipe plugin is passed as, and the function adding its mixin to a Trainer class."""
    from ..comm.plugin import GradientCompressionPlugin

    if isinstance(plugin, GradientCompressionPlugin):
        from ..integrations.trainer_compression import compression_trainer_class

        return "gradient_compression", compression_trainer_class
    from ..integrations.trainer_memory import heterogeneous_memory_trainer_class

    return "heterogeneous_memory", heterogeneous_memory_trainer_class


@dataclasses.dataclass
class TaskSetup:
    model: Any
    tokenizer: Any
    train_dataset: Any
    eval_dataset: Any
    data_collator: Any = None
    compute_metrics: Callable | None = None
    extra_metrics: dict[str, float] = dataclasses.field(default_factory=dict)


def training_arguments(recipe: Recipe):
    """TrainingArguments from the recipe's ``training`` section; errors name the recipe file."""
    from transformers import TrainingArguments

    training = dict(recipe.training)
    training.setdefault("output_dir", str(Path("runs") / Path(recipe.source).stem))
    try:
        return TrainingArguments(**training)
    except (ValueError, TypeError) as err:  # includes OptionsError from our optim_args check
        raise RecipeError(f"{recipe.source}: field 'training': {err}") from err


def _model_path(recipe: Recipe) -> str:
    model = recipe.model
    if model.embedded is not None:
        if model.embedded not in EMBEDDED_MODELS:
            raise RecipeError(
                f"{recipe.source}: field 'model.embedded': unknown model {model.embedded!r}; "
                f"allowed: {', '.join(EMBEDDED_MODELS)}"
            )
        return EMBEDDED_MODELS[model.embedded]()
    return model.name_or_path


def load_data(recipe: Recipe):
    """A DatasetDict with ``train`` and ``eval`` splits, from embedded data, local files or the hub."""
    import datasets

    data = recipe.data
    if data.embedded is not None:
        try:
            return load_embedded_dataset(data.embedded, **data.options)
        except ValueError as err:
            raise RecipeError(f"{recipe.source}: field 'data': {err}") from err
    if data.train_file is not None:
        files = {"train": data.train_file}
        if data.eval_file:
            files["eval"] = data.eval_file
        suffix = Path(data.train_file).suffix.lstrip(".")
        loaded = datasets.load_dataset({"jsonl": "json"}.get(suffix, suffix), data_files=files)
        if "eval" not in loaded:
            raise RecipeError(f"{recipe.source}: field 'data.eval_file': required with train_file")
        return loaded
    loaded = datasets.load_dataset(data.hub_dataset, data.hub_config)
    return datasets.DatasetDict(train=loaded[data.train_split], eval=loaded[data.eval_split])


def _accuracy(prediction: Any) -> dict[str, float]:
    return {"accuracy": float((np.argmax(prediction.predictions, axis=-1) == prediction.label_ids).mean())}


def _sequence_classification(recipe: Recipe, args: Any) -> TaskSetup:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

    data = recipe.data
    splits = load_data(recipe)
    label_feature = splits["train"].features[data.label_column]
    names = getattr(label_feature, "names", None) or sorted(set(splits["train"][data.label_column]))
    if not getattr(label_feature, "names", None):
        splits = splits.class_encode_column(data.label_column)
    path = _model_path(recipe)
    tokenizer = AutoTokenizer.from_pretrained(recipe.model.tokenizer or path)

    def tokenize(batch: dict[str, list]) -> dict[str, list]:
        return tokenizer(batch[data.text_column], truncation=True, max_length=data.max_length)

    with args.main_process_first(desc="tokenize"):
        tokenized = splits.map(tokenize, batched=True, remove_columns=[data.text_column])
    tokenized = tokenized.rename_column(data.label_column, "labels")
    model = AutoModelForSequenceClassification.from_pretrained(
        path,
        num_labels=len(names),
        id2label=dict(enumerate(names)),
        label2id={n: i for i, n in enumerate(names)},
        dtype=recipe.model.dtype,
    )

    return TaskSetup(
        model=model,
        tokenizer=tokenizer,
        train_dataset=tokenized["train"],
        eval_dataset=tokenized["eval"],
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=_accuracy,
    )


def _causal_lm(recipe: Recipe, args: Any) -> TaskSetup:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, default_data_collator

    data, model_section = recipe.data, recipe.model
    splits = load_data(recipe)
    if model_section.tokenizer or model_section.name_or_path:
        tokenizer = AutoTokenizer.from_pretrained(model_section.tokenizer or model_section.name_or_path)
    else:
        tokenizer = train_bpe_tokenizer(splits["train"][data.text_column], vocab_size=model_section.bpe_vocab_size)
        if args.process_index == 0:
            tokenizer.save_pretrained(Path(args.output_dir) / "tokenizer")
    eos = tokenizer.eos_token_id
    block = data.max_length

    def tokenize(batch: dict[str, list]) -> dict[str, list]:
        return {"input_ids": [ids + [eos] for ids in tokenizer(batch[data.text_column])["input_ids"]]}

    def to_blocks(batch: dict[str, list]) -> dict[str, list]:
        stream = [token for ids in batch["input_ids"] for token in ids]
        usable = len(stream) // block * block
        blocks = [stream[i : i + block] for i in range(0, usable, block)]
        return {"input_ids": blocks, "labels": [list(b) for b in blocks]}

    with args.main_process_first(desc="tokenize"):
        token_ids = splits.map(tokenize, batched=True, remove_columns=splits["train"].column_names)
        blocks = token_ids.map(to_blocks, batched=True, batch_size=1000)
    baseline = unigram_cross_entropy(token_ids["train"]["input_ids"], token_ids["eval"]["input_ids"], len(tokenizer))
    logger.warning("unigram baseline eval loss: %.4f nats/token", baseline)
    print(f"unigram baseline eval loss (nats/token): {baseline:.4f}")
    if model_section.from_config is not None:
        settings = dict(model_section.from_config)
        model_type = settings.pop("model_type", None)
        if model_type is None:
            raise RecipeError(f"{recipe.source}: field 'model.from_config.model_type': required (e.g. llama, gpt2)")
        config = AutoConfig.for_model(
            model_type, vocab_size=len(tokenizer), bos_token_id=eos, eos_token_id=eos, pad_token_id=eos, **settings
        )
        model = AutoModelForCausalLM.from_config(config)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_section.name_or_path, dtype=model_section.dtype)
    return TaskSetup(
        model=model,
        tokenizer=tokenizer,
        train_dataset=blocks["train"],
        eval_dataset=blocks["eval"],
        data_collator=default_data_collator,
        extra_metrics={"unigram_eval_loss": baseline},
    )


def _image_classification(recipe: Recipe, args: Any) -> TaskSetup:
    from transformers import default_data_collator

    data = recipe.data
    splits = load_data(recipe).rename_column(data.label_column, "labels")
    settings = dict(recipe.model.from_config)
    model_type = settings.pop("model_type", None)
    if model_type not in IMAGE_MODELS:
        raise RecipeError(f"{recipe.source}: field 'model.from_config.model_type': {model_type!r}; allowed: "
                          f"{', '.join(IMAGE_MODELS)}")
    torch.manual_seed(args.seed)
    model = IMAGE_MODELS[model_type](num_labels=splits["train"].features["labels"].num_classes, **settings)
    if recipe.model.ghost_batch_size:
        apply_ghost_batch_norm(model, recipe.model.ghost_batch_size)
    return TaskSetup(model=model, tokenizer=None, train_dataset=splits["train"], eval_dataset=splits["eval"],
                     data_collator=default_data_collator, compute_metrics=_accuracy)


TASKS: dict[str, Callable[[Recipe, Any], TaskSetup]] = {
    "sequence_classification": _sequence_classification,
    "causal_lm": _causal_lm,
    "image_classification": _image_classification,
}


def _write_json(path: Path, payload: Any) -> None:
    """Write atomically: a reader sees the old file or the whole new one, never a half-written one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str))
    os.replace(tmp, path)


def _plot(log_history: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(key: str) -> tuple[list[float], list[float]]:
        points = [(e["step"], e[key]) for e in log_history if key in e and "step" in e]
        return [p[0] for p in points], [p[1] for p in points]

    fig, (loss_ax, lr_ax) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    for key, style in (("loss", "-"), ("eval_loss", "o-")):
        steps, values = series(key)
        if steps:
            loss_ax.plot(steps, values, style, label={"loss": "train loss", "eval_loss": "eval loss"}[key])
    loss_ax.set_ylabel("loss")
    loss_ax.legend()
    loss_ax.grid(alpha=0.3)
    steps, values = series("learning_rate")
    lr_ax.plot(steps, values, "-", color="tab:green")
    lr_ax.set_ylabel("learning rate")
    lr_ax.set_xlabel("optimizer step")
    lr_ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name("tmp-" + path.name)
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def run_recipe(recipe: Recipe) -> dict[str, Any]:
    """Train and evaluate; return the final metrics (also written to ``metrics.json``)."""
    from transformers import Trainer

    args = training_arguments(recipe)
    output_dir = Path(args.output_dir)
    is_main = args.process_index == 0
    if is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        for name in FINISHED_FILES:
            (output_dir / name).unlink(missing_ok=True)
        (output_dir / "recipe.yaml").write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
        _write_json(output_dir / "status.json", {"status": "running", "recipe": recipe.source})
    started = time.time()
    try:
        setup = TASKS[recipe.task](recipe, args)
        plugins = [build_slot_entry(e, RECIPE_PLUGINS, recipe.source, "plugins") for e in recipe.plugins]
        trainer_cls, extra = Trainer, {}
        for plugin in plugins:
            slot, trainer_class_with = _plugin_trainer(plugin)
            if slot in extra:
                raise RecipeError(f"{recipe.source}: field 'plugins': {slot} given more than once")
            trainer_cls, extra[slot] = trainer_class_with(trainer_cls), plugin
        trainer = trainer_cls(
            **extra,
            model=setup.model,
            args=args,
            train_dataset=setup.train_dataset,
            eval_dataset=setup.eval_dataset,
            data_collator=setup.data_collator,
            processing_class=setup.tokenizer,
            compute_metrics=setup.compute_metrics,
            callbacks=[build_slot_entry(e, RECIPE_CALLBACKS, recipe.source, "callbacks") for e in recipe.callbacks],
        )
        train_result = trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
        eval_metrics = trainer.evaluate()
        history = trainer.state.log_history
        start_losses = [e["eval_loss"] for e in history if "eval_loss" in e and e.get("step") == 0]
        metrics = {
            **eval_metrics,
            **setup.extra_metrics,
            "train_loss": train_result.training_loss,
            "train_seconds": train_result.metrics["train_runtime"],
            "global_step": trainer.state.global_step,
            "wall_seconds": round(time.time() - started, 1),
            "optim": str(getattr(args.optim, "value", args.optim)),
            "plugins": sorted(extra),
        }
        if start_losses:
            metrics["eval_loss_at_start"] = start_losses[0]
        if recipe.task == "causal_lm":
            metrics["eval_perplexity"] = math.exp(min(eval_metrics["eval_loss"], 50.0))
        if trainer.is_world_process_zero():
            _write_json(output_dir / "metrics.json", {"metrics": metrics, "log_history": history})
            _plot(history, output_dir / "plot.png")
            _write_json(output_dir / "status.json", {"status": "completed", "recipe": recipe.source})
        return metrics
    except BaseException as err:
        if is_main:
            _write_json(
                output_dir / "status.json",
                {"status": "failed", "recipe": recipe.source, "error": f"{type(err).__name__}: {err}"},
            )
        raise
