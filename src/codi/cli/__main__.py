"""`python -m codi.cli ...` (what `torchrun -m codi.cli` and `accelerate launch -m codi.cli` run)."""

import sys

from . import main

sys.exit(main())
