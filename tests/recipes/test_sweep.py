"""The CPU-sized batch sweep: plain SGD at the reference rate loses accuracy at 16x, LARS + sqrt rule + warmup not."""

import pytest

from hf_colossal.recipes.sweep import SWEEPS, format_table, run_sweep


def test_digits_sweep_shows_the_gap_and_lars_closing_it(tmp_path):
    rows = run_sweep(SWEEPS["digits"], [1, 16], out_dir=tmp_path, methods=["sgd_ref_lr", "lars_sqrt"])
    accuracy = {(r["method"], r["batch"]): r["accuracy"] for r in rows if not r["search"]}
    assert set(accuracy) == {(m, b) for m in ("sgd_ref_lr", "lars_sqrt") for b in (32, 512)}
    sgd_drop = accuracy["sgd_ref_lr", 32] - accuracy["sgd_ref_lr", 512]
    lars_drop = accuracy["lars_sqrt", 32] - accuracy["lars_sqrt", 512]
    assert lars_drop < 0.01, format_table(rows, 32)  # within 1 point at 16x
    assert sgd_drop > lars_drop + 0.01, format_table(rows, 32)
    assert {r["steps"] for r in rows if r["batch"] == 512} == {20 * 3}


def test_unknown_method_is_named():
    with pytest.raises(ValueError, match=r"methods of this sweep: \['sgd_ref_lr', 'lars_linear', 'lars_sqrt'\]"):
        run_sweep(SWEEPS["digits"], [1], methods=["adam"])
