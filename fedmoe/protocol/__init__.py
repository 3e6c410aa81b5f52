"""What both sides of the federation share, with no torch and no TenSEAL.

The job config, the messages, the ledger format (hash chain + typed entries + file lock) and
crash-safe file writes. `fl_server`, `fl_client` and the audit import this; it imports none of
them.
"""
