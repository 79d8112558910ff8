from mlcl.compare.cli import main

raise SystemExit(main())
