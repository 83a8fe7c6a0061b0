"""envfs: an encrypted FUSE filesystem whose master key never leaves an HSM."""

__version__ = "0.1.0"
