"""The package version, readable without importing torch (`codi --version`, pyproject.toml)."""

__version__ = "0.1.0"
