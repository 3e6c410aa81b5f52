"""Privacy-budget audit of fedmoe jobs: ledger verification, reports, an empirical canary audit.

    python -m fedmoe.audit [--out DIR] [--empirical [--canaries M] [--epsilon E]] LEDGER...

Pure entry points (no printing): `audit_ledgers` (chains, contents, epsilon recomputed
independently, mirror cross-checks) and `run_canary_audit` (Steinke, Nasr & Jagielski's
one-run audit). `render_table` / `write_html_report` show a result. The ledger format itself is
`fedmoe.protocol.ledger`. matplotlib is imported only when a report is written. The privacy officer's
tool: it belongs to no party of the federation and runs wherever the ledgers are.
"""

from fedmoe.audit.canary import (
    AuditError,
    CanaryAuditConfig,
    CanaryAuditResult,
    count_guesses,
    epsilon_lower_bound,
    p_value,
    run_canary_audit,
)
from fedmoe.audit.report import render_table, write_html_report, write_report
from fedmoe.audit.verify import AuditResult, BankSummary, Finding, LedgerFile, RoundPoint, audit_ledgers

__all__ = [
    "AuditError",
    "AuditResult",
    "BankSummary",
    "CanaryAuditConfig",
    "CanaryAuditResult",
    "Finding",
    "LedgerFile",
    "RoundPoint",
    "audit_ledgers",
    "count_guesses",
    "epsilon_lower_bound",
    "p_value",
    "render_table",
    "run_canary_audit",
    "write_html_report",
    "write_report",
]
