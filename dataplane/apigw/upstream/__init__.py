"""Backends: one upstream cluster per service (pool, breaker, retry budget, timeouts) and the
HTTP/1.1 client library it sends with."""
