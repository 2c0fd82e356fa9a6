"""``python -m safetypairs`` runs the CLI (also under ``accelerate launch -m safetypairs``)."""

from safetypairs.cli import main

raise SystemExit(main())
