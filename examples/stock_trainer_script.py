"""A stock Hugging Face text-classification script, in the shape of transformers' run_classification.py.

It does NOT import hf_colossal: with the package installed, `--optim lamb` / `--optim lars` (and
`--optim_args "key=value,..."`) work because hf_colossal registers its optimizers when transformers loads.

    python examples/stock_trainer_script.py --model_name_or_path MODEL --train_file train.jsonl \
        --validation_file eval.jsonl --output_dir out --optim lamb --optim_args "max_trust_ratio=10" \
        --learning_rate 2e-3 --weight_decay 0.01

    torchrun --nproc_per_node 2 examples/stock_trainer_script.py ...   # DDP, every worker gets the optimizers
"""

from dataclasses import dataclass, field

import numpy as np
from datasets import load_dataset
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    HfArgumentParser,
    Trainer,
    TrainingArguments,
)


@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={"help": "hub name or local folder"})


@dataclass
class DataArguments:
    train_file: str = field(metadata={"help": "json lines with 'text' and 'label'"})
    validation_file: str = field(metadata={"help": "json lines with 'text' and 'label'"})
    max_seq_length: int = field(default=128)


def main() -> None:
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments))
    model_args, data_args, training_args = parser.parse_args_into_dataclasses()
    raw = load_dataset("json", data_files={"train": data_args.train_file, "validation": data_args.validation_file})
    labels = sorted(set(raw["train"]["label"]))
    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path)

    def preprocess(batch):
        encoded = tokenizer(batch["text"], truncation=True, max_length=data_args.max_seq_length)
        encoded["labels"] = [labels.index(label) for label in batch["label"]]
        return encoded

    with training_args.main_process_first(desc="tokenize"):
        data = raw.map(preprocess, batched=True, remove_columns=raw["train"].column_names)
    model = AutoModelForSequenceClassification.from_pretrained(model_args.model_name_or_path, num_labels=len(labels))

    def compute_metrics(prediction):
        return {"accuracy": float((np.argmax(prediction.predictions, -1) == prediction.label_ids).mean())}

    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=data["train"],
        eval_dataset=data["validation"],
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=compute_metrics,
    )
    trainer.train()
    metrics = trainer.evaluate()
    trainer.save_metrics("eval", metrics)
    print(f"optimizer: {type(trainer.optimizer.optimizer).__module__}.{type(trainer.optimizer.optimizer).__name__}")


if __name__ == "__main__":
    main()
