"""Offline job: datasets, training, export of artifact bundles, and audits.

May import from ``gateway`` (bundle format, defenses); ``gateway`` never imports this package.
Nothing heavy is imported here.
"""

from gateway import __version__

__all__ = ["__version__"]
