"""The config: its pydantic model (the file format's single source of truth), the loader that
reads files into it with located errors, and ConfigError."""
