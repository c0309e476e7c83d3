"""The one error a config can raise, from any file or check: every problem found, each located."""

from __future__ import annotations


class ConfigError(Exception):
    """A config that cannot be used; `errors` holds one located message per problem."""

    def __init__(self, errors: list[str]):
        super().__init__("\n".join(errors))
        self.errors = errors

    def __reduce__(self) -> tuple[type[ConfigError], tuple[list[str]]]:
        return type(self), (self.errors,)  # crosses from the reload's worker process intact


class ConfigIncomplete(ConfigError):
    """The files are mid-update: a shard that routes.yaml names is missing or holds other content.
    Not a broken config: a reload waits for the next change instead of reporting a failure."""
