"""Running Python the way a user does: a fresh interpreter, so the .pth autoload runs as it would for them."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
STOCK_SCRIPT = REPO / "examples" / "stock_trainer_script.py"


def run_python(args, *, env=None, timeout=600):
    """Run a Python subprocess the way a user would (fresh interpreter: the .pth autoload runs)."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, env=full_env, timeout=timeout, cwd=REPO
    )
