"""Privacy-first video intercom door station."""

__version__ = "0.1.0"
