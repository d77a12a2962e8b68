"""The FUSE protocol adapter: the only package that imports pyfuse3."""
