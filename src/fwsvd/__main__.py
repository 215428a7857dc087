"""``python -m fwsvd``: the command line, also as ``torchrun ... -m fwsvd compress ...``."""

import sys

from .cli import main

sys.exit(main())
