"""Training: the fit loop and what it trains."""
