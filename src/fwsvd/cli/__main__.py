"""``python -m fwsvd.cli``: the command line, as ``python -m fwsvd`` and the ``fwsvd`` script."""

import sys

from . import main

sys.exit(main())
