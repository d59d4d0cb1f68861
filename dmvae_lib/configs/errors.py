"""The one error every configuration check raises."""


class ConfigError(ValueError):
    """A configuration key, preset or value that does not exist or does not fit."""
