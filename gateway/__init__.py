"""Membership-inference-defending prediction gateway.

Nothing is imported or computed here at import time; see ``gateway.app.create_app``.
"""

__version__ = "0.1.0"
