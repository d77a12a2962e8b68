"""Domain services (Host, Domain, Checkpoints) over ports; no I/O library is imported here."""
