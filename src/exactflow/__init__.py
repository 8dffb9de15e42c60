"""exactflow: normalizing flows with exact, checkable likelihoods."""
