"""``python -m hbtrio``: the same as the ``hbtrio`` command."""

from ._cli import main

raise SystemExit(main())
