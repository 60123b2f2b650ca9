"""``python -m hbtrio._cli``: the same as the ``hbtrio`` command."""

from . import main

raise SystemExit(main())
