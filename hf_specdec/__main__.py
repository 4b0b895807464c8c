"""`python -m hf_specdec bench ...` — the same as the `hf-specdec` console script."""

import sys

from .cli import main

sys.exit(main())
