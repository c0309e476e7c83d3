"""What decides whether a request may pass: JWT auth, rate limits (GCRA), circuit breakers,
retry rules and budgets."""
