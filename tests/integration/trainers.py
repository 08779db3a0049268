"""A small real Trainer (MiniLM on BBC articles) that the integration tests configure by keyword."""

from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding, Trainer, TrainingArguments


def make_trainer(tmp_path, tokenized, minilm_path, model=None, trainer_cls=Trainer, args_cls=TrainingArguments, **kw):
    tokenizer, train, evaluation = tokenized
    settings = dict(
        output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=4, learning_rate=2e-3,
        weight_decay=0.01, report_to="none", save_strategy="no", logging_steps=1, seed=0, use_cpu=True,
        dataloader_num_workers=0, disable_tqdm=True,
    )
    settings.update(kw)
    args = args_cls(**settings)
    model = model or AutoModelForSequenceClassification.from_pretrained(minilm_path, num_labels=5)
    return trainer_cls(model=model, args=args, train_dataset=train, eval_dataset=evaluation,
                       processing_class=tokenizer, data_collator=DataCollatorWithPadding(tokenizer))
