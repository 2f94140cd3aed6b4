"""enginehouse-toy: an example third-party backend plugin for enginehouse."""

__version__ = "0.1.0"
