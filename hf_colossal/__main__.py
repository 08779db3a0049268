"""``python -m hf_colossal`` / ``accelerate launch -m hf_colossal train RECIPE``."""

import sys

from .cli import main

sys.exit(main())
