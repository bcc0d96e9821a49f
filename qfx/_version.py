"""The package version, in one place (the file format and the package metadata read it)."""
__version__ = "0.1.0"
