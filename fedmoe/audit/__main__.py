"""CLI: verify privacy ledgers, write a self-contained report, sign it off.

    python -m fedmoe.audit [--out DIR] (--pins FILE | --no-pins) [--policy BANK=FILE | --policy-dir DIR]
        [--empirical ...] LEDGER...
    python -m fedmoe.audit --sign-off NAME [--officer-key PATH] [--sign-off-failed] --out DIR LEDGER...
    python -m fedmoe.audit --verify-sign-off DIR [--officer-public-key HEX] [LEDGER...]

Verifies every ledger (bank `ledger.jsonl` files and server `ledger-mirror/<bank>.jsonl` files),
prints a table per bank and every flag with what to do, writes report.html (plots embedded),
findings.json and report.html.sha256 into --out (default: `fedmoe/audit/` next to the first ledger) and
prints the report's SHA-256. `--empirical` also runs the one-run canary audit on a tiny model
(not the job's configuration) and fails if its epsilon lower bound exceeds the claimed epsilon.
`--sign-off NAME` then signs the report with the officer's Ed25519 key (signoff.json; a FAILED
audit only with --sign-off-failed); `--verify-sign-off DIR` checks a sign-off.

Exit codes: 0 the audit passed (or the sign-off verifies), 1 it failed (or the sign-off was
refused, or does not verify), 2 bad usage.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

from rich.console import Console
from rich.logging import RichHandler

from fedmoe.audit.canary import CANARY_ROUND, AuditError, CanaryAuditConfig, claim_from_ledgers, run_canary_audit
from fedmoe.audit.report import render_table, write_report
from fedmoe.audit.signoff import SignOffError, default_officer_key, sign_off, verify_sign_off
from fedmoe.audit.verify import audit_ledgers
from fedmoe.crypto.errors import CryptoError
from fedmoe.crypto.identity import ConsortiumPins, load_pins


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m fedmoe.audit",
        description="Verify fedmoe privacy ledgers (hash chains, independent epsilon) and write an HTML report.",
    )
    parser.add_argument("ledgers", nargs="*", type=Path, metavar="LEDGER", help="bank ledgers and/or server mirrors")
    parser.add_argument(
        "--out", type=Path, default=None, help="report folder (default: fedmoe/audit/ next to the first ledger)"
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
        help="pinned consortium identity keys (pins JSON; repeat to merge): every entry's signature must verify, "
        "and every pinned bank must have a ledger among the files",
    )
    parser.add_argument(
        "--bank",
        action="append",
        default=None,
        metavar="BANK",
        help="audit only these banks (repeat): pinned banks outside them need no ledger here (default: every "
        "pinned bank must have one)",
    )
    parser.add_argument(
        "--no-pins",
        action="store_true",
        help="audit without pinned keys (signatures checked only against the keys the entries name: anyone can "
        "re-sign a forged ledger); without --pins or --no-pins the audit fails",
    )
    parser.add_argument(
        "--policy",
        action="append",
        default=[],
        metavar="BANK=FILE",
        help="a bank's policy file (repeat per bank): every entry of that bank must carry its hash and comply with it",
    )
    parser.add_argument(
        "--policy-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="every DIR/<bank>.toml is that bank's policy (the officer bundles' policy/ folder, untarred together); "
        "--policy wins for a bank named in both",
    )
    _add_sign_off_args(parser)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress")
    args = parser.parse_args(argv)
    if args.verify_sign_off is not None:
        if args.sign_off or args.empirical:
            parser.error("--verify-sign-off checks an existing sign-off: no --sign-off or --empirical with it")
        return args
    if not args.ledgers and not args.empirical:
        parser.error("give at least one LEDGER, or --empirical")
    if args.sign_off_failed and not args.sign_off:
        parser.error("--sign-off-failed needs --sign-off NAME")
    if args.inject_no_noise and not args.empirical:
        parser.error("--inject-no-noise needs --empirical")
    bad = [p for p in args.policy if "=" not in p or not p.split("=", 1)[0] or not p.split("=", 1)[1]]
    if bad:
        parser.error(f"--policy expected BANK=FILE, got {bad[0]!r}")
    args.policies = {**policies_in(args.policy_dir, parser), **dict(p.split("=", 1) for p in args.policy)}
    return args


def policies_in(folder: Path | None, parser: argparse.ArgumentParser) -> dict[str, str]:
    """{bank: path} of every <bank>.toml in `folder` (an officer bundle's policy/ folder); {} without one."""
    if folder is None:
        return {}
    if not folder.is_dir():
        parser.error(f"--policy-dir {folder}: not a folder")
    found = {path.stem: str(path) for path in sorted(folder.glob("*.toml"))}
    if not found:
        parser.error(f"--policy-dir {folder}: no <bank>.toml in it")
    return found


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


def _add_sign_off_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sign-off", metavar="NAME", help="sign the report as privacy officer NAME (signoff.json)")
    parser.add_argument(
        "--officer-key",
        type=Path,
        default=None,
        metavar="PATH",
        help=f"the officer's Ed25519 key file, generated (mode 0600) if missing (default {default_officer_key()})",
    )
    parser.add_argument(
        "--sign-off-failed", action="store_true", help="sign off a FAILED audit too (the statement says failed)"
    )
    parser.add_argument(
        "--verify-sign-off",
        type=Path,
        metavar="DIR",
        help="check DIR/signoff.json: its signature, report.html and findings.json unchanged, and the heads of "
        "any LEDGER given",
    )
    parser.add_argument(
        "--officer-public-key", metavar="HEX", help="with --verify-sign-off: the officer's public key known out of band"
    )


def _verify_sign_off(args: argparse.Namespace, console: Console) -> int:
    try:
        check = verify_sign_off(args.verify_sign_off, public_key=args.officer_public_key, ledgers=args.ledgers)
    except SignOffError as err:
        console.print(f"[bold red]sign-off does NOT verify:[/] {err}", soft_wrap=True)
        return 1
    signed = check.signed
    for problem in check.problems:
        console.print(f"[red]changed since the sign-off:[/] {problem}", soft_wrap=True)
    if not check.ok:
        console.print("[bold red]sign-off does NOT verify[/]")
        return 1
    console.print(
        f"[bold green]sign-off verifies:[/] {signed.get('officer')} signed the report as {signed.get('verdict')} "
        f"at {signed.get('signed_at')} (report SHA-256 {signed['report']['sha256']}, officer key "
        f"{signed.get('public_key')})",
        soft_wrap=True,
    )
    return 0


def _sign_off(args: argparse.Namespace, out: Path, console: Console) -> int:
    try:
        path = sign_off(
            out,
            officer=args.sign_off,
            key_path=args.officer_key or default_officer_key(),
            allow_failed=args.sign_off_failed,
        )
    except SignOffError as err:
        console.print(f"[bold red]sign-off refused:[/] {err}", soft_wrap=True)
        return 1
    console.print(f"signed off: {path} (officer {args.sign_off})", soft_wrap=True)
    return 0


def _canary_config(args: argparse.Namespace, console: Console) -> CanaryAuditConfig | None:
    """The claim to audit: the first bank ledger's own single-round claim, else --epsilon/--delta."""
    claim = claim_from_ledgers(args.ledgers) if args.ledgers else None
    fault = 0.0 if args.inject_no_noise else None
    try:
        if claim is None:
            return CanaryAuditConfig(canaries=args.canaries, target_epsilon=args.epsilon, delta=args.delta,
                                     seed=args.seed, noise_multiplier_override=fault)  # fmt: skip
        console.print(f"empirical audit of the claim of {claim['source']}: epsilon {claim['target_epsilon']:.4g}",
                      soft_wrap=True)  # fmt: skip
        training = dataclasses.replace(CANARY_ROUND, local_steps=claim["steps"])
        return CanaryAuditConfig(
            canaries=args.canaries, target_epsilon=claim["target_epsilon"], delta=claim["delta"], seed=args.seed,
            noise_multiplier=claim["noise_multiplier"], sample_rate=claim["sample_rate"], training=training,
            noise_multiplier_override=fault,
        )  # fmt: skip
    except AuditError as err:
        console.print(f"[red]error:[/] {err}")
        return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Piped output (make audit | tee, CI logs) gets a wide table instead of rich's 80 columns.
    console = Console(width=None if sys.stdout.isatty() else 160)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(message)s",
        handlers=[RichHandler(console=console, show_path=False)],
    )
    if args.verify_sign_off is not None:
        return _verify_sign_off(args, console)
    try:
        pins = merged_pins(args.pins)
    except CryptoError as err:
        console.print(f"[red]error:[/] {err}")
        return 2
    if pins is not None and args.no_pins:
        console.print("[red]error:[/] --pins and --no-pins contradict each other: pass one")
        return 2
    result = audit_ledgers(
        args.ledgers, pins=pins, policies=args.policies, pins_required=not args.no_pins, scope=args.bank
    )
    if args.empirical:
        config = _canary_config(args, console)
        if config is None:
            return 2
        with console.status(f"empirical audit: {args.canaries} canaries, private rounds on the tiny model"):
            result = result.with_empirical(run_canary_audit(config))
    render_table(result, console)
    out = args.out or ((args.ledgers[0].parent / "audit") if args.ledgers else Path("audit"))
    files = write_report(result, out)
    console.print(f"report: {files.html.absolute()}", soft_wrap=True)
    console.print(f"report SHA-256: {files.sha256} (also in {files.sha256_file.absolute()})", soft_wrap=True)
    console.print(f"findings: {files.findings.absolute()}", soft_wrap=True)
    if args.sign_off and _sign_off(args, out, console) != 0:
        return 1
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
