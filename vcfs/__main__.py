"""Allow `python -m vcfs`."""

from vcfs.cli import main

raise SystemExit(main())
