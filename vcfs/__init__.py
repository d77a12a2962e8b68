"""vcfs: a FUSE filesystem exposing checkpoints and backups of running QEMU virtual machines."""

__version__ = "0.1.0"
