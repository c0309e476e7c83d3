"""Real parts for tests and benchmarks: a Redis process, backend servers, signed tokens.

It ships with the code so that tests, `bench/` and users' own tests start the same real things.
"""
