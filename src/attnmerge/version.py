"""The package version, importable by any module without importing the package front door."""

__version__ = "0.1.0"
