"""``python -m sample``: see :mod:`sample.cli`."""

import sys

from sample.cli import main

sys.exit(main())
