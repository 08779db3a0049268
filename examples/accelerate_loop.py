"""A plain accelerate training loop with hf_colossal's LAMB (no Trainer).

    accelerate launch examples/accelerate_loop.py            # or: python examples/accelerate_loop.py

Fine-tunes the packaged MiniLM on the BBC topics for a few hundred steps; runs offline.
"""

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

import hf_colossal
from hf_colossal.recipes.data import load_bbc_news, minilm_model_path


def main(max_steps: int = 60) -> None:
    accelerator = Accelerator()
    path = minilm_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    splits = load_bbc_news()
    data = splits.map(lambda b: tokenizer(b["text"], truncation=True, max_length=64), batched=True,
                      remove_columns=["text"]).rename_column("label", "labels")
    collate = DataCollatorWithPadding(tokenizer)
    train = DataLoader(data["train"], batch_size=32, shuffle=True, collate_fn=collate)
    evaluation = DataLoader(data["eval"], batch_size=64, collate_fn=collate)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=5)
    optimizer = hf_colossal.build_optimizer("lamb", model, lr=2e-3, weight_decay=0.01, eps=1e-6,
                                            options="max_trust_ratio=10")
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, 1 - step / max_steps))
    model, optimizer, train, evaluation, schedule = accelerator.prepare(model, optimizer, train, evaluation, schedule)
    model.train()
    step = 0
    while step < max_steps:
        for batch in train:
            loss = model(**batch).loss
            accelerator.backward(loss)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
            step += 1
            if step % 10 == 0:
                accelerator.print(f"step {step} loss {loss.item():.4f}")
            if step == max_steps:
                break
    model.eval()
    correct = total = 0
    for batch in evaluation:
        with torch.no_grad():
            predictions = model(**batch).logits.argmax(-1)
        predictions, labels = accelerator.gather_for_metrics((predictions, batch["labels"]))
        correct += (predictions == labels).sum().item()
        total += labels.numel()
    accelerator.print(f"held-out accuracy {correct / total:.4f}")


if __name__ == "__main__":
    main()
