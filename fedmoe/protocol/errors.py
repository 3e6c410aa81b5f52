"""The exception types shared by both sides of the federation."""


class ConfigError(ValueError):
    """A bad run-config, node-config or policy value; the message names the key, expected vs got."""


class LedgerError(ValueError):
    """A ledger file or entry is malformed or its chain is broken; names file, line, field, expected vs got."""
