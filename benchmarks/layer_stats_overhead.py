"""Cost of LayerStatsCallback in a real Trainer run: step time with and without it, same logging.

The 271M Llama-style model of shared/notes/anchors.md (hidden 1024, 16 layers, vocab 32000), bf16 autocast, batch
8 x 512 random tokens, LAMB, ``--logging_steps 10`` in both runs (so Trainer's own logging cost is in both). Each
configuration runs twice, alternating, after one warm-up run; the figure is the mean time per step over steps
11..N (the first 10 include compilation and allocator warm-up), taken from a callback's clock.

    python benchmarks/layer_stats_overhead.py [--steps 60]
"""

import argparse
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

from hf_colossal.callbacks import LayerStatsCallback


class RandomTokens(torch.utils.data.Dataset):
    def __init__(self, n, length, vocab):
        self.data = torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        return {"input_ids": self.data[i], "labels": self.data[i]}


class StepClock(TrainerCallback):
    def __init__(self):
        self.times = []

    def on_step_end(self, args, state, control, **kwargs):
        torch.cuda.synchronize()
        self.times.append(time.perf_counter())


def run(steps, with_stats):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=16,
                         num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=512, use_cache=False)
    model = LlamaForCausalLM(config)
    args = TrainingArguments("/tmp/layer_stats_overhead", optim="lamb", learning_rate=1e-3, weight_decay=0.01,
                             bf16=True, per_device_train_batch_size=8, max_steps=steps, logging_steps=10,
                             report_to="none", save_strategy="no", disable_tqdm=True, dataloader_num_workers=2)
    clock = StepClock()
    callbacks = [clock] + ([LayerStatsCallback()] if with_stats else [])
    trainer = Trainer(model=model, args=args, train_dataset=RandomTokens(steps * 8, 512, 32000), callbacks=callbacks)
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    keys = sum(1 for k in logged[-1] if k.startswith("layers/"))
    gaps = [b - a for a, b in zip(clock.times[10:], clock.times[11:])]
    return statistics.mean(gaps) * 1e3, keys


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60)
    steps = parser.parse_args().steps
    run(20, True)  # warm-up: kernels, allocator
    results = {False: [], True: []}
    for with_stats in (False, True, False, True):
        ms, keys = run(steps, with_stats)
        results[with_stats].append(ms)
        print(f"RUN with_stats={with_stats} step_ms={ms:.2f} layer_keys_in_last_log={keys}", flush=True)
    base, stats = statistics.mean(results[False]), statistics.mean(results[True])
    print(f"RESULT without {base:.2f} ms/step, with LayerStatsCallback {stats:.2f} ms/step, "
          f"overhead {100 * (stats / base - 1):+.2f}% (logging every 10 steps)")


if __name__ == "__main__":
    main()
