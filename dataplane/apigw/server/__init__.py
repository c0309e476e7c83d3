"""Processes and listeners: serving, the connection handler, reloads, TLS, workers, debug."""
