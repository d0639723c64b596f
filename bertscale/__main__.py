"""``python -m bertscale``: the same command line as the ``bertscale`` script (for a checkout that is on
``PYTHONPATH`` but not installed, e.g. a GPU machine that reaches no package registry)."""

import sys

from bertscale.cli import main

sys.exit(main())
