"""`python -m policyd` is the `policyd` command."""

from policyd.cli import main

raise SystemExit(main())
