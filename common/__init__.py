"""The library the course's chapters build on: one module per concept (see the README's map)."""

__version__ = "0.1.0"
