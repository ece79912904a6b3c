"""Keter for Python: a web-app deployment daemon in front of nginx."""

__version__ = "0.1.0"
