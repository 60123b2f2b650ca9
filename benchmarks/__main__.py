"""``python -m benchmarks``: run the whole suite (see `benchmarks.runner`)."""

import sys

from .runner import main

sys.exit(main())
