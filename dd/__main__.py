"""`python -m dd` is the `deep-detection` command."""

from dd.cli import main

raise SystemExit(main())
