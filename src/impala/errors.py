"""The one exception type for bad user input (flags, configs, env ids, host lists)."""


class ConfigError(ValueError):
    """Bad input from the user. The CLI prints its message on one line and exits with code 2."""
