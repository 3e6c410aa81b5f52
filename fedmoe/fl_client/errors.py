"""The fl_client package's exception types (ConfigError is shared with the server: fedmoe.protocol.errors)."""

from fedmoe.protocol.errors import ConfigError

__all__ = ["ConfigError", "DataError"]


class DataError(ValueError):
    """Bad bank data or data arguments; the message names the file/line/field (or record), expected vs got."""
