"""exactflow: normalizing flows with exact, checkable likelihoods."""

__version__ = "0.1.0"
