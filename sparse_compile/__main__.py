"""``python -m sparse_compile``: see :mod:`sparse_compile.cli`."""

from sparse_compile.cli import main

raise SystemExit(main())
