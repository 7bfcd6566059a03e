"""The package version: a leaf module, so files that record it import nothing else of the package."""

__version__ = "0.1.0"
"""The version of nola_vision, recorded in every adapter file it writes (``library_version``)."""
