"""`python -m llmux`: the same entry point as the `llmux` command."""

from llmux.cli import main

raise SystemExit(main())
