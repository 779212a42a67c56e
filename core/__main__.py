"""``python -m kdforge`` is the ``kdforge`` program (so ``accelerate launch -m kdforge run ...`` works)."""

import sys

from .cli import main

sys.exit(main())
