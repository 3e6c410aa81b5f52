"""A bank's own site: keys born at the bank, checks before it joins, its standing, the officer's bundle.

    fedmoe site init    --dir SITE --bank-id bank-1      keys made here; public/ is what the operator gets
    fedmoe site pins    --dir SITE --pins FILE           install the consortium's pins (prints fingerprints)
    fedmoe site keys deal     --dir SITE                 the dealer bank makes the job's BFV key pair
    fedmoe site keys request  --dir SITE                 any other bank asks the dealer for the secret key
    fedmoe site keys deliver  --dir SITE --request F     the dealer seals the secret key to that bank
    fedmoe site keys accept   --dir SITE --delivery F --dealer bank-0
    fedmoe site check   --dir SITE                       everything that could refuse a job, before any job
    fedmoe site status  --dir SITE                       lifetime epsilon spent and left, jobs, refusals
    fedmoe site officer-bundle --dir SITE --out F.tar.gz ledgers + pins + policy hash for the audit
                                                      (manifests/<bank>.json: every file's SHA-256)

A site folder (mode 0700) holds everything the bank's containers mount:

    site.json      the bank's id
    secrets/       node.key (SuperNode authentication, 0600), node.pub, exec.secret
    keys/          <bank>.identity.secret (Ed25519, 0600), pins.json, context.secret.bfv (0600)
    config/        policy.toml (the bank's privacy policy, its alone), approved-apps
    data/          the bank's records (never copied anywhere by fedmoe)
    state/         privacy/<dataset>/ledger.jsonl (the lifetime budget) and jobs/
    public/        what may leave the bank: node.pub, <bank>.identity.json (its pin), and for the
                   dealer context.public.bfv + bfv-key.json; key requests/deliveries travel as files

The operator relays only public files and sealed key deliveries (fedmoe.crypto.secagg.ceremony: the
BFV secret is encrypted to the requesting bank's ephemeral X25519 key and signed by the dealer).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import re
import shutil
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

from fedmoe.crypto.errors import CryptoError
from fedmoe.crypto.identity import ConsortiumPins, generate_identity, load_identity, load_pins, write_pins
from fedmoe.crypto.node_keys import EXEC_SECRET, NODE_KEY, NODE_PUB, make_node_key, make_secret, write_file
from fedmoe.crypto.secagg.bfv import INFO_FILE as BFV_INFO_FILE
from fedmoe.crypto.secagg.bfv import PUBLIC_FILE as BFV_PUBLIC_FILE
from fedmoe.crypto.secagg.bfv import SECRET_FILE as BFV_SECRET_FILE
from fedmoe.fl_client.errors import ConfigError
from fedmoe.fl_client.policy import BankPolicy
from fedmoe.protocol.config import CONTAINER_UID, PINS_FILE, identity_file_name
from fedmoe.protocol.files import atomic_write_json, fsync_dir
from fedmoe.protocol.ledger import read_verified

SITE_FILE = "site.json"
KEY_JOB = "consortium"  # the job id a BFV key request names (one key per consortium, not per job)


class SiteError(ConfigError):
    """A site command that cannot proceed; the message names the file or step and what to do."""


@dataclass(frozen=True)
class Site:
    root: Path
    bank_id: str

    secrets = property(lambda self: self.root / "secrets")
    keys = property(lambda self: self.root / "keys")
    config = property(lambda self: self.root / "config")
    data = property(lambda self: self.root / "data")
    state = property(lambda self: self.root / "state")
    public = property(lambda self: self.root / "public")
    identity_path = property(lambda self: self.keys / identity_file_name(self.bank_id))
    pins_path = property(lambda self: self.keys / PINS_FILE)
    bfv_secret = property(lambda self: self.keys / BFV_SECRET_FILE)
    policy_path = property(lambda self: self.config / "policy.toml")
    approved_apps = property(lambda self: self.config / "approved-apps")
    request_secret = property(lambda self: self.keys / "key-request.secret")
    request_file = property(lambda self: self.keys / "key-request.bin")

    @property
    def pin_file(self) -> Path:
        """The bank's own pin (public), what the operator merges into the consortium's pins."""
        return self.public / f"{self.bank_id}.identity.json"

    @classmethod
    def load(cls, root: str | Path) -> Site:
        root = Path(root)
        try:
            bank_id = json.loads((root / SITE_FILE).read_text(encoding="utf-8"))["bank_id"]
        except FileNotFoundError:
            raise SiteError(f"{root}: not a fedmoe site folder (no {SITE_FILE}); run `fedmoe site init`") from None
        except (ValueError, KeyError, TypeError) as e:
            raise SiteError(f"{root / SITE_FILE}: expected {{'bank_id': ...}}: {e}") from e
        return cls(root, bank_id)


# ---- init ---------------------------------------------------------------------------------------
def init_site(root: str | Path, bank_id: str, *, policy_example: Path | None = None) -> Site:
    """Creates the site folder with keys made here; refuses a folder that already is a site."""
    root = Path(root)
    if (root / SITE_FILE).exists():
        raise SiteError(f"{root}: already a site of {Site.load(root).bank_id!r}; keys are never regenerated in place")
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    root.chmod(0o700)
    site = Site(root, bank_id)
    for folder in (site.secrets, site.keys, site.config, site.data, site.state, site.public):
        folder.mkdir(mode=0o700, exist_ok=True)
    site.public.chmod(0o755)
    make_node_key(site.secrets)
    make_secret(site.secrets / EXEC_SECRET)
    identity = generate_identity(site.identity_path, bank_id)
    shutil.copy2(site.secrets / NODE_PUB, site.public / NODE_PUB)
    write_pins(site.pin_file, ConsortiumPins({bank_id: identity.public_key}))
    if policy_example is not None and policy_example.is_file():
        write_file(site.policy_path, policy_example.read_bytes(), 0o600)
    write_file(site.approved_apps, b"# SHA-256 of app bundles this bank approved (one per line)\n", 0o644)
    atomic_write_json(root / SITE_FILE, {"bank_id": bank_id}, mode=0o644)
    fsync_dir(root)
    return site


# ---- pins and the BFV key -----------------------------------------------------------------------
def install_pins(site: Site, pins_file: str | Path) -> ConsortiumPins:
    """Installs the consortium's pins after checking this bank's own pin is in it, unchanged."""
    pins = load_pins(pins_file)
    own = load_identity(site.identity_path).public_key
    if pins.keys.get(site.bank_id) != own:
        raise SiteError(f"{pins_file}: the key pinned for {site.bank_id!r} is not this bank's identity; not installed")
    write_pins(site.pins_path, pins)
    return pins


def fingerprints(pins: ConsortiumPins) -> list[str]:
    """One line per bank, to compare out of band (phone, signed mail) before trusting the pins."""
    return [f"{bank}: {hashlib.sha256(key).hexdigest()[:32]}" for bank, key in sorted(pins.keys.items())]


def deal_key(site: Site) -> str:
    """The dealer bank's BFV key pair: the secret stays in keys/, the public context goes to public/."""
    from fedmoe.crypto.secagg.bfv_secret import bfv_keygen  # secret-key code: loaded only here

    if site.bfv_secret.exists():
        raise SiteError(f"{site.bfv_secret} exists: this site already holds the consortium's BFV key")
    files = bfv_keygen(site.keys)
    for name in (BFV_PUBLIC_FILE, BFV_INFO_FILE):
        shutil.copy2(site.keys / name, site.public / name)
        (site.public / name).chmod(0o644)
    return files.key_id


def request_key_file(site: Site) -> Path:
    """Writes the signed key request (public/) and keeps its ephemeral secret (keys/, 0600)."""
    from fedmoe.crypto.secagg.ceremony import request_key

    request, ephemeral_secret = request_key(load_identity(site.identity_path), KEY_JOB)
    write_file(site.request_secret, ephemeral_secret, 0o600)
    write_file(site.request_file, request.to_bytes(), 0o600)
    return write_file(site.public / f"key-request.{site.bank_id}.bin", request.to_bytes(), 0o644)


def deliver_key_file(site: Site, request_path: str | Path, out: str | Path) -> Path:
    """The dealer answers one request: the secret key sealed to the requester, signed by the dealer."""
    from fedmoe.crypto.secagg.ceremony import KeyRequest, deliver_key

    request = KeyRequest.from_bytes(Path(request_path).read_bytes())
    pins = _pins(site)
    delivery = deliver_key(load_identity(site.identity_path), pins, request, site.bfv_secret)
    return write_file(Path(out), delivery.to_bytes(), 0o644)


def accept_key_file(site: Site, delivery_path: str | Path, dealer: str) -> str:
    """Opens the dealer's delivery into keys/context.secret.bfv (0600); the ephemeral secret is deleted."""
    from fedmoe.crypto.secagg.ceremony import KeyDelivery, KeyRequest, accept_key

    if not site.request_secret.exists():
        raise SiteError(f"{site.request_secret}: no open key request; run `fedmoe site keys request` first")
    request = KeyRequest.from_bytes(site.request_file.read_bytes())
    delivery = KeyDelivery.from_bytes(Path(delivery_path).read_bytes())
    identity, pins = load_identity(site.identity_path), _pins(site)
    key = accept_key(
        identity, pins, request, site.request_secret.read_bytes(), delivery, site.bfv_secret, dealer=dealer
    )
    site.request_secret.unlink()
    site.request_file.unlink()
    return key.key_id


def _pins(site: Site) -> ConsortiumPins:
    if not site.pins_path.exists():
        raise SiteError(f"{site.pins_path}: no consortium pins yet; run `fedmoe site pins --pins FILE` first")
    return load_pins(site.pins_path)


# ---- check: everything that could refuse a job, before any job ------------------------------------
@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


def check_site(site: Site) -> list[Check]:
    """Identity, SuperNode key, pins, BFV key, policy, data and approved apps, each named."""
    checks = [
        _check("identity", lambda: f"{load_identity(site.identity_path).public_key.hex()[:16]}..."),
        _check("supernode-key", lambda: _private_file(site.secrets / NODE_KEY)),
        _check("pins", lambda: _check_pins(site)),
        _check("bfv-key", lambda: _check_bfv(site)),
        _check("policy", lambda: _check_policy(site)),
        _check("data", lambda: _check_data(site)),
        _check("approved-apps", lambda: _check_approved(site)),
        _check("kit", lambda: _check_kit(site)),
        _check("container-user", lambda: _check_container_user(site)),
    ]
    return checks


def _check(name: str, run) -> Check:
    try:
        return Check(name, True, run())
    except (ConfigError, CryptoError, OSError, ValueError) as e:
        return Check(name, False, str(e))


def _private_file(path: Path) -> str:
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise SiteError(f"{path}: mode {mode:04o} lets group/others read it, expected 0600")
    return f"{path.name} (0600)"


def _check_pins(site: Site) -> str:
    pins = _pins(site)
    if pins.keys.get(site.bank_id) != load_identity(site.identity_path).public_key:
        raise SiteError(f"{site.pins_path}: the key pinned for {site.bank_id!r} is not this bank's identity")
    return f"{len(pins.keys)} banks pinned: {', '.join(pins.banks)}"


def _check_bfv(site: Site) -> str:
    from fedmoe.crypto.secagg.bfv_secret import load_bfv_secret

    if not site.bfv_secret.exists():
        raise SiteError(f"{site.bfv_secret}: missing; the dealer runs `keys deal`, every other bank `keys request`")
    return f"key {load_bfv_secret(site.bfv_secret).key_id[:12]}"


def _check_policy(site: Site) -> str:
    if not site.policy_path.exists():
        return "no config/policy.toml: the strict defaults apply (epsilon 8.0 per dataset)"
    policy = BankPolicy.from_file(site.policy_path)
    return f"epsilon {policy.epsilon:g}, max-delta {policy.max_delta:g}, unit {policy.privacy_unit}"


def kit_data_file(site: Site) -> Path | None:
    """The data file the kit's executor reads (node-config data-path /data/NAME -> data/NAME), if a kit is here."""
    compose = site.root / "docker-compose.yml"
    if not compose.is_file():
        return None
    import yaml

    services = (yaml.safe_load(compose.read_text(encoding="utf-8")) or {}).get("services", {})
    for service in services.values():
        text = (service.get("environment") or {}).get("FEDMOE_NODE_CONFIG", "")
        match = re.search(r"data-path='/data/([^']+)'", text)
        if match:
            return site.data / match.group(1)
    return None


def _check_data(site: Site) -> str:
    from fedmoe.fl_client.data.files import load_text_file

    files = sorted(p for p in site.data.iterdir() if p.is_file() and not p.name.startswith("."))
    expected = kit_data_file(site)
    if expected is not None and not expected.is_file():  # the executor would exit 2: "no such file"
        found = f"; found {', '.join(p.name for p in files)}" if files else ""
        raise SiteError(
            f"the kit's executor reads data-path /data/{expected.name}, i.e. "
            f"{expected.relative_to(site.root)}: no such file{found}"
        )
    if not files:
        return "no data file: the bank trains on its slice of the synthetic corpus"
    counts = [f"{p.name}: {len(load_text_file(p))} records" for p in files]
    return "; ".join(counts)


def _check_approved(site: Site) -> str:
    hashes = [
        line.split()[0]
        for line in site.approved_apps.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    bad = [h for h in hashes if len(h) != 64 or any(c not in "0123456789abcdef" for c in h)]
    if bad:
        raise SiteError(f"{site.approved_apps}: not a SHA-256: {bad[0][:70]!r}")
    if not hashes:
        raise SiteError(f"{site.approved_apps}: no approved app; add the release's SHA-256 (one per line)")
    return f"{len(hashes)} approved"


def _check_kit(site: Site) -> str:
    """The operator's kit is in the site folder, its .env too (`cp kit/*` leaves the dotfile behind, and
    without it the compose project is named after the folder: two sites in folders of one name collide)."""
    if not (site.root / "docker-compose.yml").is_file():
        raise SiteError(
            f"{site.root}: no docker-compose.yml; copy the operator's kit in: cp -r banks/{site.bank_id}/. SITE/"
        )
    env = site.root / ".env"
    want = f"COMPOSE_PROJECT_NAME=fedmoe-{site.bank_id}"
    lines = env.read_text(encoding="utf-8").splitlines() if env.is_file() else []
    if want not in lines:
        raise SiteError(
            f"{env}: missing or without {want!r} (cp kit/* skips the .env; copy with cp -r kit/. SITE/): "
            f"docker-compose would name the project after the folder {site.root.resolve().name!r}"
        )
    return f"docker-compose.yml, .env (project fedmoe-{site.bank_id})"


def _check_container_user(site: Site) -> str:
    """The kit's containers run as uid 10001: every file they mount must be theirs to read (state/: to write).

    A site made by root (or any other user) holds 0600 keys the SuperNode and executor cannot open:
    without this check the bank learns it from a container that restarts with "Permission denied".
    """
    mounted = [site.secrets / NODE_KEY, site.secrets / EXEC_SECRET, site.secrets / "ca.crt"]
    for folder in (site.keys, site.config, site.data, site.state):
        mounted += [folder, *sorted(folder.rglob("*"))]
    for path in mounted:
        if not path.exists():
            continue
        st = path.stat()
        writable = site.state in (path, *path.parents)  # state/ and everything in it: read and write
        need = (0o5 if path.is_dir() else 0o4) | (0o2 if writable else 0)
        if st.st_uid == CONTAINER_UID:
            ok = (st.st_mode >> 6) & need == need
        else:
            ok = st.st_mode & need == need  # "others" bits; the container user is in no group of the host
        if not ok:
            raise SiteError(
                f"{path}: owner uid {st.st_uid}, mode {st.st_mode & 0o777:04o}: the kit's containers run as uid "
                f"{CONTAINER_UID} and cannot {'write' if need & 0o2 else 'read'} it; run "
                f"`chown -R {CONTAINER_UID}:{CONTAINER_UID} {site.root}` (as root) before docker-compose up"
            )
    return f"every mounted file readable by uid {CONTAINER_UID} (state/ writable)"


# ---- status: the bank's own standing ---------------------------------------------------------------
@dataclass(frozen=True)
class DatasetStanding:
    dataset: str  # the ledger folder (dataset fingerprint prefix)
    spent: float  # the lifetime epsilon the ledger records
    budget: float  # the bank's policy budget
    jobs: dict[str, int]  # job id -> rounds trained
    refusals: list[str]  # the last few refusals, newest last
    chain_ok: bool


def standing(site: Site) -> list[DatasetStanding]:
    """One line per dataset the bank ever trained on, its budget from the bank's own policy."""
    policy = BankPolicy.from_file(site.policy_path) if site.policy_path.exists() else BankPolicy()
    out = []
    for ledger in sorted((site.state / "privacy").glob("*/ledger.jsonl")):
        report, entries = read_verified(ledger)
        trained = [e for e in entries if e.get("status") == "trained"]
        jobs: dict[str, int] = {}
        for e in trained:
            jobs[e.get("job_id", "?")] = jobs.get(e.get("job_id", "?"), 0) + 1
        refusals = [
            f"{e.get('job_id')} round {e.get('round')}: {e.get('reason') or e.get('status')}"
            for e in entries
            if e.get("status") != "trained"
        ][-3:]
        # As the audit counts it (fedmoe.audit.verify.BankSummary.epsilon_spent): the largest of the recorded,
        # the PLD and the replace-one epsilon. The recorded one alone said "left 1.738" of 8 after a job whose
        # replace-one epsilon was 7.996, and the next job was refused for the lifetime budget (walked with Docker).
        spent = max((_spent(e) for e in trained), default=0.0)
        out.append(DatasetStanding(ledger.parent.name, spent, policy.epsilon, jobs, refusals, report.ok))
    return out


def _spent(entry: dict) -> float:
    return max(float(entry.get(key) or 0.0) for key in ("epsilon", "epsilon_pld", "epsilon_replace_one"))


# ---- the officer's bundle --------------------------------------------------------------------------
def officer_bundle(site: Site, out: str | Path) -> Path:
    """ledgers + the bank's pin + consortium pins + policy (and its SHA-256): public material only."""
    members: dict[str, bytes] = {}
    for ledger in sorted((site.state / "privacy").glob("*/ledger.jsonl")):
        members[f"ledgers/{site.bank_id}/{ledger.parent.name}.jsonl"] = ledger.read_bytes()
    members[f"pins/{site.pin_file.name}"] = site.pin_file.read_bytes()
    if site.pins_path.exists():
        members["pins/pins.json"] = site.pins_path.read_bytes()
    policy = site.policy_path.read_bytes() if site.policy_path.exists() else b""
    if policy:
        members[f"policy/{site.bank_id}.toml"] = policy
    manifest = {
        "bank_id": site.bank_id,
        "policy_sha256": hashlib.sha256(policy).hexdigest() if policy else "",
        "files": {name: hashlib.sha256(data).hexdigest() for name, data in sorted(members.items())},
    }
    # One name per bank: the officer untars every bundle into one folder (the runbook's audit-in/), where
    # a shared "manifest.json" kept only the last bank's (walked with Docker, session 9).
    members[f"manifests/{site.bank_id}.json"] = json.dumps(manifest, indent=2, sort_keys=True).encode()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(out, "w:gz") as tar:
        for name, data in sorted(members.items()):
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    return out


# ---- command line ------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedmoe site", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    init = sub.add_parser("init", help="create the site folder; keys are made here")
    init.add_argument("--bank-id", required=True)
    init.add_argument("--policy-example", type=Path, default=None, help="policy to start from (edit it after)")
    pins = sub.add_parser("pins", help="install the consortium pins (checks this bank's own pin)")
    pins.add_argument("--pins", type=Path, required=True)
    keys = sub.add_parser("keys", help="the BFV key, bank to bank: deal | request | deliver | accept")
    keys.add_argument("action", choices=["deal", "request", "deliver", "accept"])
    keys.add_argument("--request", type=Path, help="deliver: a bank's key-request.<bank>.bin")
    keys.add_argument("--delivery", type=Path, help="accept: the dealer's delivery file")
    keys.add_argument("--dealer", help="accept: the bank that dealt the key")
    keys.add_argument("--out", type=Path, help="deliver: where to write the delivery (default public/)")
    sub.add_parser("check", help="everything that could refuse a job, checked now")
    sub.add_parser("status", help="lifetime epsilon spent and left per dataset, jobs, refusals")
    bundle = sub.add_parser("officer-bundle", help="ledgers, pins and policy hash for the privacy officer")
    bundle.add_argument("--out", type=Path, required=True)
    for sp in sub.choices.values():
        sp.add_argument("--dir", type=Path, required=True, help="the bank's site folder")
    return p


def _keys(site: Site, a: argparse.Namespace) -> None:
    if a.action == "deal":
        print(
            f"BFV key {deal_key(site)[:12]} dealt; send {site.public}/{BFV_PUBLIC_FILE} and "
            f"{BFV_INFO_FILE} to the operator"
        )
    elif a.action == "request":
        print(f"key request written: {request_key_file(site)} (send it to the dealer, via the operator)")
    elif a.action == "deliver":
        if a.request is None:
            raise SiteError("keys deliver: --request FILE is required")
        request_bank = a.request.name.removeprefix("key-request.").removesuffix(".bin")
        out = a.out or site.public / f"key-delivery.{request_bank}.bin"
        print(f"sealed delivery written: {deliver_key_file(site, a.request, out)} (send it back to {request_bank})")
    else:
        if a.delivery is None or not a.dealer:
            raise SiteError("keys accept: --delivery FILE and --dealer BANK are required")
        print(f"BFV key {accept_key_file(site, a.delivery, a.dealer)[:12]} installed in {site.bfv_secret}")


def _print_status(site: Site) -> None:
    rows = standing(site)
    if not rows:
        print(f"{site.bank_id}: no ledger yet (nothing spent)")
    for r in rows:
        chain = "" if r.chain_ok else "  LEDGER CHAIN BROKEN: run the audit"
        print(
            f"{site.bank_id} dataset {r.dataset}: epsilon spent {r.spent:.3f} of {r.budget:g} "
            f"(the bank's policy), left {r.budget - r.spent:.3f}{chain}"
        )
        for job, rounds in sorted(r.jobs.items()):
            print(f"  job {job}: {rounds} round(s) trained")
        for refusal in r.refusals:
            print(f"  refused: {refusal}")


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    try:
        if a.command == "init":
            site = init_site(a.dir, a.bank_id, policy_example=a.policy_example)
            print(f"site {site.bank_id} created in {site.root}; hand the operator only {site.public}/")
            return 0
        site = Site.load(a.dir)
        if a.command == "pins":
            print(
                "\n".join(
                    [
                        "pins installed; compare these fingerprints out of band:",
                        *fingerprints(install_pins(site, a.pins)),
                    ]
                )
            )
        elif a.command == "keys":
            _keys(site, a)
        elif a.command == "check":
            checks = check_site(site)
            for c in checks:
                print(f"{'ok  ' if c.ok else 'FAIL'} {c.name}: {c.detail}")
            return 0 if all(c.ok for c in checks) else 1
        elif a.command == "status":
            _print_status(site)
        else:
            print(f"officer bundle written: {officer_bundle(site, a.out)}")
    except (ConfigError, CryptoError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
