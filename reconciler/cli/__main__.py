"""``python -m reconciler.cli``: the same as the ``infernet`` script."""

import sys

from reconciler.cli import main

sys.exit(main())
