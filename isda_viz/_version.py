"""The package version, in one place (setuptools reads it from here too)."""

__version__ = "0.1.0"
