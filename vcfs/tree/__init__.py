"""The pure node tree: which names exist, what a read returns, what a write does. No FUSE here."""
