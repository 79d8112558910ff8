"""``python -m mlcl.bench`` runs the ``mlcl-bench`` command line."""

from mlcl.bench.cli import main

raise SystemExit(main())
