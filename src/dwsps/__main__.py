"""``python -m dwsps`` runs the CLI."""

from dwsps.cli import main

raise SystemExit(main())
