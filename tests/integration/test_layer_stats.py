"""LayerStatsCallback: per-layer statistics in Trainer's own logs, seen by the reporting callbacks."""

import math

import pytest
from transformers import TrainerCallback

from hf_colossal.callbacks import LayerStatsCallback

from .trainers import make_trainer


class LogsSeen(TrainerCallback):
    """Stands in for TensorBoard / W&B: a callback placed before ours that records what on_log hands it."""

    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


def _train(tmp_path, tokenized, minilm_path, callback, **kw):
    trainer = make_trainer(tmp_path, tokenized, minilm_path, max_steps=4, logging_steps=2, **kw)
    seen = LogsSeen()
    trainer.add_callback(seen)
    trainer.add_callback(callback)
    trainer.train()
    return trainer, [logs for logs in seen.logs if "loss" in logs]


def test_lamb_logs_trust_ratios_that_explain_the_update(tmp_path, tokenized, minilm_path):
    trainer, logs = _train(tmp_path, tokenized, minilm_path, LayerStatsCallback(), optim="lamb",
                           max_grad_norm=1e9, lr_scheduler_type="constant")
    assert len(logs) == 2  # steps 2 and 4, handed to the reporting callback before ours runs
    history = [h for h in trainer.state.log_history if "loss" in h]
    name = "bert.encoder.layer.0.attention.self.query.weight"
    for entry, recorded in zip(logs, history):
        assert entry[f"layers/{name}/trust_ratio"] == recorded[f"layers/{name}/trust_ratio"]  # trainer_state too
        # LAMB moves an adapted weight by lr * (||x|| / ||u||) * ||u|| = lr * ||x||: update_ratio == lr
        assert entry[f"layers/{name}/update_ratio"] == pytest.approx(2e-3, rel=1e-3)
        assert f"layers/{name.replace('weight', 'bias')}/trust_ratio" not in entry  # biases do not adapt
        assert entry[f"layers/{name.replace('weight', 'bias')}/update_norm"] > 0
        grad_norms = [v for k, v in entry.items() if k.startswith("layers/") and k.endswith("/grad_norm")
                      and not k.startswith("layers/summary/")]
        assert math.sqrt(sum(g * g for g in grad_norms)) == pytest.approx(entry["grad_norm"], rel=1e-4)
        assert entry["layers/summary/trust_ratio_min"] <= entry[f"layers/{name}/trust_ratio"]


def test_any_optimizer_gets_norms_and_a_summary_only_option(tmp_path, tokenized, minilm_path):
    _, logs = _train(tmp_path, tokenized, minilm_path, LayerStatsCallback(include=r"classifier", per_layer=False),
                     optim="adamw_torch")
    assert logs and all("layers/summary/update_norm_max" in entry for entry in logs)
    assert not any(k.startswith("layers/") and "summary" not in k for entry in logs for k in entry)
    assert not any("trust_ratio" in k for entry in logs for k in entry)


def test_clear_errors(tmp_path, tokenized, minilm_path):
    with pytest.raises(ValueError, match="matches no trainable parameter"):
        _train(tmp_path, tokenized, minilm_path, LayerStatsCallback(include="no_such_layer"), optim="lamb")
    with pytest.raises(ValueError, match="needs --logging_strategy steps"):
        _train(tmp_path, tokenized, minilm_path, LayerStatsCallback(), optim="lamb", logging_strategy="epoch")
