"""The fl_client package's exception type."""


class DataError(ValueError):
    """Bad bank data or data arguments; the message names the file/line/field (or record), expected vs got."""


class ConfigError(ValueError):
    """A bad run-config or node-config value; the message names the key, expected vs got."""
