"""Privacy-budget audit of fedmoe jobs: ledger verification, reports, an empirical canary audit.

    python -m fl_server.audit [--out DIR] [--empirical [--canaries M] [--epsilon E]] LEDGER...

Pure entry points (no printing): `audit_ledgers` (chains, contents, epsilon recomputed
independently, mirror cross-checks) and `run_canary_audit` (Steinke, Nasr & Jagielski's
one-run audit). `render_table` / `write_html_report` show a result. The server's budget
decisions, `bank_exhausted` and `select_banks`, live with the ledger format in fl_client.ledger
and are re-exported here. matplotlib is imported only when a report is written.
"""

from fl_client.ledger import BankSelection, bank_exhausted, latest_bank_entry, select_banks
from fl_server.audit.canary import (
    AuditError,
    CanaryAuditConfig,
    CanaryAuditResult,
    count_guesses,
    epsilon_lower_bound,
    p_value,
    run_canary_audit,
)
from fl_server.audit.report import render_table, write_html_report
from fl_server.audit.verify import AuditResult, BankSummary, Finding, LedgerFile, RoundPoint, audit_ledgers

__all__ = [
    "AuditError",
    "AuditResult",
    "BankSelection",
    "BankSummary",
    "CanaryAuditConfig",
    "CanaryAuditResult",
    "Finding",
    "LedgerFile",
    "RoundPoint",
    "audit_ledgers",
    "bank_exhausted",
    "count_guesses",
    "epsilon_lower_bound",
    "latest_bank_entry",
    "p_value",
    "render_table",
    "run_canary_audit",
    "select_banks",
    "write_html_report",
]
