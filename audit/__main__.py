"""CLI: python -m audit [--out DIR] [--empirical [--canaries M] [--epsilon E]] LEDGER...

Verifies every ledger (bank `ledger.jsonl` files and server `ledger-mirror/<bank>.jsonl` files),
prints a table per bank, writes report.html + epsilon.png + noise.png into --out (default:
`audit/` next to the first ledger), and exits 1 when any check fails (2 on bad usage).
`--empirical` also runs the one-run canary audit on a tiny model and fails if its epsilon lower
bound exceeds the claimed epsilon.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from rich.console import Console
from rich.logging import RichHandler

from audit.canary import AuditError, CanaryAuditConfig, run_canary_audit
from audit.report import render_table, write_html_report
from audit.verify import audit_ledgers
from crypto.errors import CryptoError
from crypto.identity import ConsortiumPins, load_pins


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m audit",
        description="Verify fedmoe privacy ledgers (hash chains, independent epsilon) and write an HTML report.",
    )
    parser.add_argument("ledgers", nargs="*", type=Path, metavar="LEDGER", help="bank ledgers and/or server mirrors")
    parser.add_argument(
        "--out", type=Path, default=None, help="report folder (default: audit/ next to the first ledger)"
    )
    parser.add_argument("--empirical", action="store_true", help="also run the one-run canary audit (tiny model)")
    parser.add_argument("--canaries", type=int, default=1000, help="canaries m for --empirical (default 1000)")
    parser.add_argument("--epsilon", type=float, default=2.0, help="claimed epsilon of the audited round (default 2)")
    parser.add_argument("--delta", type=float, default=1e-5, help="delta of the audited round (default 1e-5)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the empirical audit (default 0)")
    parser.add_argument(
        "--inject-no-noise",
        action="store_true",
        help="fault injection for demos: train the audited round with noise_multiplier=0 (the audit must fail)",
    )
    parser.add_argument(
        "--pins",
        type=Path,
        action="append",
        default=[],
        metavar="FILE",
        help="pinned consortium identity keys (pins JSON; repeat to merge): every entry's signature must verify",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress")
    args = parser.parse_args(argv)
    if not args.ledgers and not args.empirical:
        parser.error("give at least one LEDGER, or --empirical")
    if args.inject_no_noise and not args.empirical:
        parser.error("--inject-no-noise needs --empirical")
    return args


def merged_pins(files: list[Path]) -> ConsortiumPins | None:
    """One pin set from several pins files (a consortium file, or each bank's identity.pins.json)."""
    if not files:
        return None
    keys: dict[str, bytes] = {}
    for path in files:
        for bank, key in load_pins(path).keys.items():
            if keys.setdefault(bank, key) != key:
                raise CryptoError(f"pins file {path}: bank {bank!r} is pinned to two different keys")
    return ConsortiumPins(keys)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Piped output (make audit | tee, CI logs) gets a wide table instead of rich's 80 columns.
    console = Console(width=None if sys.stdout.isatty() else 160)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(message)s",
        handlers=[RichHandler(console=console, show_path=False)],
    )
    try:
        pins = merged_pins(args.pins)
    except CryptoError as err:
        console.print(f"[red]error:[/] {err}")
        return 2
    result = audit_ledgers(args.ledgers, pins=pins)
    if args.empirical:
        try:
            config = CanaryAuditConfig(
                canaries=args.canaries,
                target_epsilon=args.epsilon,
                delta=args.delta,
                seed=args.seed,
                noise_multiplier_override=0.0 if args.inject_no_noise else None,
            )
        except AuditError as err:
            console.print(f"[red]error:[/] {err}")
            return 2
        with console.status(f"empirical audit: {args.canaries} canaries, one private round on the tiny model"):
            result = result.with_empirical(run_canary_audit(config))
    render_table(result, console)
    out = args.out or ((args.ledgers[0].parent / "audit") if args.ledgers else Path("audit"))
    report = write_html_report(result, out)
    console.print(f"report: {report}")
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
