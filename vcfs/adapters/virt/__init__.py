"""The libvirt backend: the same tree over libvirt's own checkpoint and backup API.

- `errors`: libvirt's error codes → vcfs's errors, in one place;
- `connection`: one connection per host, its event loop thread, keepalive, reconnection, and
  every blocking call run off the trio loop with a deadline;
- `documents`: the XML the backend reads and completes (lxml);
- `checkpoints`, `backups`: the tree's `Checkpoints` and `Backups` over libvirt;
- `host`: the domains of a connection, appearing and vanishing with libvirt's events.

Only this package (and the rest of `vcfs.adapters`) imports `libvirt`.
"""
