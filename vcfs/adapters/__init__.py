"""Adapters: the only layer that talks to QEMU, the disk, lxml and the OS."""
