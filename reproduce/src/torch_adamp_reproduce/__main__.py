"""``python -m torch_adamp_reproduce``: the ``torch-adamp`` command."""

import sys

from .cli import main

sys.exit(main())
