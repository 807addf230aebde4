"""Auditing: attacks x attacker views against a bundle or a live endpoint, reports and sweeps."""
