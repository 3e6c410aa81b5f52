"""Provisioning: one startup kit per site (server, each bank), as NVIDIA FLARE does it.

    python -m fedmoe.fl_server.provision --out deploy/kits --banks 3 --superlink-name fl.example.org \
        [--data bank-0=/srv/fl/train.jsonl] [--policy bank-0=bank0-policy.toml] [--app .]
    python -m fedmoe.fl_server.provision release --app . --out deploy/kits/release   # what banks pin
    python -m fedmoe.fl_server.provision register --superlink HOST:PORT --ca CA --keys DIR   # operator

Writes, under --out:
    ca/            the CA's private key and certificate: stays with whoever provisions (offline)
    server/        docker-compose.yml, secrets/{ca.crt, server.pem, server.key, exec.secret},
                   supernodes/<bank>.pub (the only bank material the SuperLink gets), keys/ (CKKS
                   and BFV public contexts, pins.json), README.md
    bank-<i>/      docker-compose.yml, secrets/{ca.crt, node.key, node.pub, exec.secret},
                   config/{approved-apps, policy.toml}, keys/ (CKKS and BFV secret contexts,
                   pins.json, <bank>.identity.secret), data/, README.md
A bank's kit holds the CA certificate but never a private key other than its own (its SuperNode
authentication key, its identity key, and the job's CKKS/BFV secret contexts that all banks share
by design and the server never gets). tests/deploy/test_provision.py walks the folders to check it.
Every kit's compose file runs `fedmoe.fl_server.deploy.service_commands`, the table the loopback
launcher and the one-host docker-compose.yml use.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import ipaddress
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedmoe.crypto.identity import ConsortiumPins, load_pins, write_pins
from fedmoe.crypto.node_keys import NODE_PUB, make_node_key, make_secret, write_file
from fedmoe.crypto.secagg.bfv import INFO_FILE as BFV_INFO_FILE
from fedmoe.crypto.secagg.bfv import PUBLIC_FILE as BFV_PUBLIC_FILE
from fedmoe.fl_server.deploy import (
    BANK_KEY_FILES,
    COMPOSE_RUN_CONFIG,
    FLOWER_ENV,
    POLICY_PATH,
    SERVER_KEY_FILES,
    UID,
    bank_services,
    compose_topology,
    container_bank,
    render_yaml,
    server_services,
)
from fedmoe.fl_server.submit import write_kit_file
from fedmoe.protocol.config import PINS_FILE

REPO_ROOT = Path(__file__).resolve().parents[2]
BFV_PUBLIC_FILES = (BFV_PUBLIC_FILE, BFV_INFO_FILE)
POLICY_EXAMPLE = REPO_ROOT / "deploy" / "bank-policy.example.toml"
VALID_DAYS = 365


# ---- key material -----------------------------------------------------------------------------
_write = write_file  # secrets are written with their mode from the first byte on


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def make_ca(out: Path, name: str = "fedmoe-ca") -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A self-signed CA (ECDSA P-384): ca.key (0600) and ca.crt in `out`; reuses an existing pair."""
    if (out / "ca.key").exists() and (out / "ca.crt").exists():
        key = serialization.load_pem_private_key((out / "ca.key").read_bytes(), None)
        return key, x509.load_pem_x509_certificate((out / "ca.crt").read_bytes())
    key = ec.generate_private_key(ec.SECP384R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .sign(key, hashes.SHA384())
    )
    _write(out / "ca.key", _pem_key(key), 0o600)
    _write(out / "ca.crt", cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return key, cert


def issue_server_cert(
    ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, names: list[str], out: Path
) -> None:
    """server.pem + server.key for the SuperLink, valid for every DNS name / IP in `names`."""
    key = ec.generate_private_key(ec.SECP384R1())
    sans: list[x509.GeneralName] = []
    for n in names:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            sans.append(x509.DNSName(n))
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=VALID_DAYS))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA384())
    )
    _write(out / "server.key", _pem_key(key), 0o600)
    _write(out / "server.pem", cert.public_bytes(serialization.Encoding.PEM), 0o644)


# ---- the app banks approve --------------------------------------------------------------------
def stage_app(app: Path, out: Path) -> str:
    """Copies the files Flower bundles from `app` into `out`; returns the bundle's SHA-256.

    `flwr run <out> ...` then submits exactly that bundle (Flower builds bundles deterministically:
    sorted paths, fixed zip timestamps), so the hash banks pin is the `fab-hash` they receive, and
    later edits to the working tree do not change what is submitted.
    """
    import zipfile
    from io import BytesIO

    from flwr.cli.build import build_fab_from_disk

    if out.exists():
        shutil.rmtree(out)
    with zipfile.ZipFile(BytesIO(build_fab_from_disk(app.resolve()))) as fab:
        for info in fab.infolist():
            if not info.filename.startswith(".info/"):
                _write(out / info.filename, fab.read(info), 0o644)
    return hashlib.sha256(build_fab_from_disk(out)).hexdigest()


def release(app: Path, out: Path) -> tuple[Path, str]:
    """Stage the app as released and write `<out>/app.sha256`: the hash each bank pins."""
    staged = out / "app"
    digest = stage_app(app, staged)
    (out / "app.sha256").write_text(f"{digest}  fedmoe release\n")  # no operator path leaves in it
    return staged, digest


# ---- kits ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BankSpec:
    bank_id: str
    data_file: str = ""  # host path of the bank's data file ("" = synthetic slice)
    policy_file: str = ""  # host path of the bank's privacy policy ("" = the example when present)


def _readme_server(out: Path, superlink: str) -> str:
    return f"""# fedmoe server kit

Runs the SuperLink and the ServerApp executor. Nothing here can decrypt an update: `keys/` holds
the CKKS *public* context only, and the banks' private keys are not in this kit.

1. `docker-compose up -d superlink serverapp`   (Docker with compose; image `fedmoe:latest`
   built from the release with `docker build -f deploy/Dockerfile -t fedmoe:latest .`)
2. `docker-compose run --rm register`           (registers the bank keys in `supernodes/`; only
   these SuperNodes can join; rerun after adding a bank)
3. From the operator's machine (the only place that may submit runs), with the released app:
   `fedmoe submit --kit <this kit> --app <release>/app --run-config '{COMPOSE_RUN_CONFIG}'`
   (connects to {superlink} with this kit's `secrets/ca.crt`, from `kit.json`; streams the
   ServerApp's output and exits non-zero with the run's status when the job does not complete).

Port {superlink.rsplit(":", 1)[-1]} must be reachable by the banks (set FLEET_BIND in `.env`). Flower 1.42 serves the
Fleet, Control and Runtime APIs on that one port; see docs/deployment.md for what that means and
how to restrict run submission.
"""


def _readme_bank(bank: str, superlink: str, data_name: str, identity: bool, policy: bool) -> str:
    data = (
        f"`data/{data_name}` (put the bank's JSONL/CSV/Parquet file with a `text` column there)"
        if data_name
        else "none: this bank trains on its slice of the synthetic corpus (set --data when provisioning)"
    )
    return f"""# fedmoe bank kit: {bank}

What runs here: `{bank}` (Flower SuperNode: talks to the SuperLink at {superlink} over TLS,
authenticated by `secrets/node.key`) and `{bank}-apps` (the executor that runs the training
app; the only container that sees `keys/`, `data/` and the state volume, and it has no network
but the bank's own internal one).

Three commands (Docker with compose; image `fedmoe:latest` from the released source):
1. `docker-compose up -d`                      start the SuperNode and its executor
2. `docker-compose ps`                          both `Up (healthy)`; `docker-compose logs -f {bank}`
                                                shows it connected and waiting for work
3. `docker-compose down`                        stop (state stays in the `state` volume)

What your security team controls, all in this folder:
- `config/approved-apps`: the SHA-256 of every app release the bank approved. The executor runs
  nothing else: any other app bundle is refused before its code is unpacked. To approve a new
  release, check its code and the publisher's signature, then add its `app.sha256` line.
- `config/policy.toml`: the bank's privacy policy{
        "" if policy else " (none provided at provisioning: copy deploy/bank-policy.example.toml)"
    }.
- data: {data}.
- `keys/`: {
        f"the job's CKKS and BFV secret contexts (shared by the banks, never the server's), "
        f"`pins.json` (every bank's public identity key) and `{bank}.identity.secret`, this bank's "
        "Ed25519 identity (signs its ledger and secure-aggregation messages)"
        if identity
        else "empty: the key ceremony was skipped at provisioning (--no-ckks); see docs/deployment.md"
    }.
- `secrets/`: `ca.crt` (to verify the SuperLink), this bank's SuperNode key pair, the executor
  secret.
  No other party's private key is in this kit. Send only `secrets/node.pub` to the operator.
The bank needs outbound access to {superlink} only; Flower telemetry is off.
"""


def _chown_tree(root: Path) -> None:
    """As root, hand the kit's files to the image's user (compose bind-mounts them as they are)."""
    if os.geteuid() != 0:
        return
    for path in [root, *root.rglob("*")]:
        os.chown(path, UID, UID, follow_symlinks=False)


@dataclass(frozen=True)
class _KitContext:
    """What every kit of one provisioning run shares."""

    out: Path
    ca_pem: bytes
    superlink_names: list[str]
    port: int
    ceremony: Path  # the temporary key ceremony folder ("" keys when ckks is off)
    ckks: bool
    digest: str  # SHA-256 of the release every bank approves ("" without --app)

    @property
    def superlink(self) -> str:
        return f"{self.superlink_names[0]}:{self.port}"


def provision(
    out: Path,
    banks: list[BankSpec],
    *,
    superlink_names: list[str],
    port: int = 8000,
    app: Path | None = None,
    ckks: bool = True,
) -> dict[str, Path]:
    """Writes the CA, the server kit and one kit per bank under `out`; returns site -> folder."""
    out.mkdir(parents=True, exist_ok=True)
    (out / ".gitignore").write_text("*\n!.gitignore\n")
    ca_key, ca_cert = make_ca(out / "ca")
    digest = release(app, out / "release")[1] if app is not None else ""
    ceremony = Path(tempfile.mkdtemp(prefix="fedmoe-ceremony-"))
    ctx = _KitContext(out, (out / "ca" / "ca.crt").read_bytes(), superlink_names, port, ceremony, ckks, digest)
    try:
        if ckks:  # CKKS + BFV key pairs, one identity per bank, the pins (fedmoe.fl_server.ceremony)
            from fedmoe.fl_server.ceremony import loopback_ceremony

            loopback_ceremony(ceremony, [b.bank_id for b in banks])
        sites = {"server": _server_kit(ctx, ca_key, ca_cert, n_banks=len(banks))}
        for i, spec_b in enumerate(banks):
            sites[spec_b.bank_id] = _bank_kit(ctx, i, spec_b)
    finally:
        shutil.rmtree(ceremony, ignore_errors=True)
    for site in sites.values():
        os.chmod(site, 0o700)
        _chown_tree(site)
    return sites


def _server_kit(ctx: _KitContext, ca_key, ca_cert, *, n_banks: int) -> Path:
    """The operator's kit: TLS certificate, executor secret, public keys, compose file, README."""
    server = ctx.out / "server"
    _write(server / "secrets" / "ca.crt", ctx.ca_pem, 0o644)
    issue_server_cert(ca_key, ca_cert, ctx.superlink_names, server / "secrets")
    make_secret(server / "secrets" / "exec.secret")
    if ctx.ckks:
        for name in SERVER_KEY_FILES:
            _write(server / "keys" / name, (ctx.ceremony / name).read_bytes(), 0o644)
    topo = replace(compose_topology(n_banks), superlink_host=ctx.superlink_names[0], superlink_port=ctx.port)
    services, secrets_ = server_services(
        topo, publish="${FLEET_BIND:-0.0.0.0}:" + str(ctx.port), secrets_dir=".", keys="./keys", state="state"
    )
    spec = {
        "version": "3.8",
        "services": services,
        "networks": {"fleet": {}, "server": {"internal": True}},
        "volumes": {"state": {}},
        "secrets": secrets_,
    }
    header = "# fedmoe server kit (generated by python -m fedmoe.fl_server.provision)\n"
    (server / "docker-compose.yml").write_text(render_yaml(header, spec))
    (server / "README.md").write_text(_readme_server(server, ctx.superlink))
    write_kit_file(server, ctx.superlink)  # what `fedmoe submit` connects with
    return server


def _bank_kit(ctx: _KitContext, index: int, spec_b: BankSpec) -> Path:
    """One bank's kit: its SuperNode key, executor secret, keys, approved apps, policy, compose, README."""
    kit = ctx.out / spec_b.bank_id
    _write(kit / "secrets" / "ca.crt", ctx.ca_pem, 0o644)
    make_node_key(kit / "secrets")
    shutil.copy2(kit / "secrets" / "node.pub", _mkdir(ctx.out / "server" / "supernodes") / f"{spec_b.bank_id}.pub")
    make_secret(kit / "secrets" / "exec.secret")
    identity = f"{spec_b.bank_id}.identity.secret"
    if ctx.ckks:  # the shared CKKS/BFV secrets, the pins, and this bank's own identity only
        for name in (*BANK_KEY_FILES, identity):
            _write(kit / "keys" / name, (ctx.ceremony / name).read_bytes(), 0o600)
    _mkdir(kit / "keys")
    config = _mkdir(kit / "config")
    approved = f"{ctx.digest}  fedmoe release (provisioned)\n" if ctx.digest else ""
    (config / "approved-apps").write_text("# SHA-256 of app bundles this bank approved (one per line)\n" + approved)
    policy_src = Path(spec_b.policy_file) if spec_b.policy_file else POLICY_EXAMPLE
    has_policy = policy_src.is_file()
    if has_policy:
        shutil.copy2(policy_src, config / "policy.toml")
    data_name = Path(spec_b.data_file).name if spec_b.data_file else ""
    _mkdir(kit / "data")
    if spec_b.data_file and Path(spec_b.data_file).is_file():
        shutil.copy2(spec_b.data_file, kit / "data" / data_name)
    (kit / "docker-compose.yml").write_text(_bank_compose(ctx, index, spec_b, data_name, has_policy, identity))
    (kit / "README.md").write_text(_readme_bank(spec_b.bank_id, ctx.superlink, data_name, ctx.ckks, has_policy))
    return kit


def _bank_compose(
    ctx: _KitContext,
    index: int,
    spec_b: BankSpec,
    data_name: str,
    has_policy: bool,
    identity: str,
    state: str = "state",
) -> str:
    node = container_bank(
        index, data_path=f"/data/{data_name}" if data_name else "", policy_file=POLICY_PATH if has_policy else ""
    )
    node = replace(node, bank_id=spec_b.bank_id, identity_key=f"/keys/{identity}")
    btopo = replace(compose_topology(1, banks=(node,)), superlink_host=ctx.superlink_names[0], superlink_port=ctx.port)
    services, secrets_ = bank_services(
        btopo, 0, kit=".", keys="./keys", state=state, data="./data" if data_name else None
    )
    secrets_["ca-cert"] = {"file": "./secrets/ca.crt"}
    spec = {
        "version": "3.8",
        "services": services,
        "networks": {"fleet": {}, f"{spec_b.bank_id}-net": {"internal": True}},
        "volumes": {"state": {}} if state == "state" else {},
        "secrets": secrets_,
    }
    header = f"# fedmoe bank kit for {spec_b.bank_id} (generated by python -m fedmoe.fl_server.provision)\n"
    return render_yaml(header, spec)


# ---- a consortium of sovereign sites: the operator gets public material only -------------------------
SITE_DATA_FILE = "records.jsonl"  # where a bank's site keeps its records (data/), as its kit's compose names it


def provision_consortium(
    out: Path,
    bank_public: dict[str, Path],
    *,
    superlink_names: list[str],
    dealer: str,
    port: int = 8000,
    app: Path | None = None,
) -> dict[str, Path]:
    """The operator's side of a consortium whose banks made their own keys (`fedmoe site init`).

    Reads only each bank's public/ folder (node.pub, <bank>.identity.json, and the dealer's BFV
    public context); writes the CA, the server kit (TLS, executor secret, registered node keys, the
    consortium pins and the BFV public context) and per bank a public kit for its site folder
    (CA certificate, compose file, .env with its own project name, pins.json, README). No bank
    private key, secret context, policy or record ever passes through `out`.
    """
    if dealer not in bank_public:
        raise SystemExit(f"error: dealer {dealer!r} is not one of the banks {sorted(bank_public)}")
    pins = _merge_pins(bank_public)
    dealer_public = bank_public[dealer]
    missing = [name for name in BFV_PUBLIC_FILES if not (dealer_public / name).is_file()]
    if missing:
        raise SystemExit(f"error: {dealer_public}: no {missing}; the dealer runs `fedmoe site keys deal` first")
    out.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = make_ca(out / "ca")
    digest = release(app, out / "release")[1] if app is not None else ""
    ctx = _KitContext(out, (out / "ca" / "ca.crt").read_bytes(), superlink_names, port, out, False, digest)
    server = _server_kit(ctx, ca_key, ca_cert, n_banks=len(bank_public))
    write_pins(server / "keys" / PINS_FILE, pins)
    for name in BFV_PUBLIC_FILES:
        _write(server / "keys" / name, (dealer_public / name).read_bytes(), 0o644)
    sites = {"server": server}
    for index, (bank, public) in enumerate(sorted(bank_public.items())):
        _write(server / "supernodes" / f"{bank}.pub", (public / NODE_PUB).read_bytes(), 0o644)
        sites[bank] = _site_kit(ctx, index, bank, pins)
    _write(server / ".env", b"COMPOSE_PROJECT_NAME=fedmoe-server\n", 0o644)
    _chown_tree(server)  # as root: the server kit's TLS key and secret (0600) to the containers' user
    return sites


def _merge_pins(bank_public: dict[str, Path]) -> ConsortiumPins:
    keys: dict[str, bytes] = {}
    for bank, public in sorted(bank_public.items()):
        pin = load_pins(public / f"{bank}.identity.json")
        if set(pin.keys) != {bank}:
            raise SystemExit(f"error: {public}: its identity pin names {sorted(pin.keys)}, expected only {bank!r}")
        keys[bank] = pin.keys[bank]
    return ConsortiumPins(keys)


def _site_kit(ctx: _KitContext, index: int, bank: str, pins: ConsortiumPins) -> Path:
    """What the operator hands a bank for its site folder: public files only."""
    kit = ctx.out / "banks" / bank
    _write(kit / "secrets" / "ca.crt", ctx.ca_pem, 0o644)
    write_pins(kit / PINS_FILE, pins)
    spec = BankSpec(bank)
    compose = _bank_compose(ctx, index, spec, SITE_DATA_FILE, True, f"{bank}.identity.secret", state="./state")
    (kit / "docker-compose.yml").write_text(compose)
    _write(kit / ".env", f"COMPOSE_PROJECT_NAME=fedmoe-{bank}\n".encode(), 0o644)
    approved = f"{ctx.digest}  fedmoe release\n" if ctx.digest else ""
    (kit / "README.md").write_text(_readme_site(bank, ctx.superlink, approved))
    return kit


def _readme_site(bank: str, superlink: str, approved: str) -> str:
    return f"""# fedmoe kit for {bank}'s site (public files from the operator)

Copy every file here into your site folder (the one `fedmoe site init --bank-id {bank}` made),
then, in the site folder:

1. `fedmoe site pins --dir . --pins pins.json`, and compare the printed fingerprints with the other
   banks out of band before you go on.
2. The BFV key: the dealer bank already ran `fedmoe site keys deal`; every other bank runs
   `fedmoe site keys request --dir .`, sends `public/key-request.{bank}.bin` to the dealer (via the
   operator, who only relays it), and with the dealer's answer runs
   `fedmoe site keys accept --dir . --delivery key-delivery.{bank}.bin --dealer <dealer>`.
3. Put your records in `data/{SITE_DATA_FILE}` (JSONL with a `text` column; optional `customer_id`)
   and edit `config/policy.toml` (your privacy policy: nobody else sees it).
4. Approve the release: add its SHA-256 to `config/approved-apps`:
   {approved.strip() or "(the operator sends the release's SHA-256 with the release)"}
5. As root: `chown -R {UID}:{UID} .` (the containers run as uid {UID} and the keys are 0600), then
   `fedmoe site check --dir .` (must print no FAIL), then `docker-compose up -d` (the project name is
   fedmoe-{bank}, from `.env`; the SuperLink is {superlink}).

`state/` holds your lifetime privacy ledger: it is a folder of the site, not a Docker volume, so
`docker-compose down -v` does not reset your budget. `fedmoe site status --dir .` shows what is spent
and left; `fedmoe site officer-bundle --dir . --out bundle.tar.gz` collects what the privacy officer audits.
"""


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


# ---- operator: register bank keys ---------------------------------------------------------------
def register(superlink: str, ca: str, keys_dir: Path, *, flwr: str = "flwr") -> int:
    """Registers every `*.pub` in `keys_dir` that the SuperLink does not know yet (idempotent)."""
    home = Path(tempfile.mkdtemp(prefix="fedmoe-flwr-"))
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "fedmoe"\n\n[superlink.fedmoe]\naddress = "{superlink}"\nroot-certificates = "{ca}"\n'
    )
    env = {**os.environ, **FLOWER_ENV, "FLWR_HOME": str(home)}
    failures = 0
    for pub in sorted(keys_dir.glob("*.pub")):
        res = subprocess.run(
            [flwr, "supernode", "register", str(pub), "fedmoe", "--name", pub.stem, "--format", "json"],
            capture_output=True,
            text=True,
            env=env,
        )
        text = (res.stdout + res.stderr).strip()
        try:
            reply = json.loads(res.stdout)
        except ValueError:
            reply = {}
        if res.returncode == 0 and reply.get("success"):
            print(f"{pub.stem}: registered as node {reply.get('node-id')}")
        elif "already in use" in text or "already registered" in text:
            print(f"{pub.stem}: already registered")
        else:
            failures += 1
            print(f"{pub.stem}: registration failed: {text[-400:]}", file=sys.stderr)
    shutil.rmtree(home, ignore_errors=True)
    return 1 if failures else 0


def _pairs(items: list[str], what: str) -> dict[str, str]:
    out = {}
    for item in items:
        bank, sep, value = item.partition("=")
        if not sep or not bank or not value:
            raise SystemExit(f"error: {what} expects BANK=PATH, got {item!r}")
        out[bank] = value
    return out


def _consortium_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="fedmoe provision consortium",
        description="The operator's kits for banks that made their own keys (fedmoe site init): public files only.",
    )
    p.add_argument("--out", type=Path, required=True, help="the operator's folder")
    p.add_argument("--bank", action="append", default=[], required=True, help="BANK=PATH of the bank's public/ folder")
    p.add_argument("--dealer", required=True, help="the bank that dealt the BFV key (fedmoe site keys deal)")
    p.add_argument("--superlink-name", action="append", default=[], help="DNS name or IP of the SuperLink (repeat)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--app", type=Path, default=None, help="app folder to release (its SHA-256 goes to the banks)")
    a = p.parse_args(argv)
    banks = {bank: Path(path) for bank, path in _pairs(a.bank, "--bank").items()}
    sites = provision_consortium(
        a.out, banks, superlink_names=a.superlink_name or ["superlink"], dealer=a.dealer, port=a.port, app=a.app
    )
    for site, folder in sites.items():
        print(f"{site}: {folder}")
    print("send each bank its banks/<bank>/ folder; the server kit is server/ (no bank secret is in either)")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["register"]:
        p = argparse.ArgumentParser(prog="python -m fedmoe.fl_server.provision register")
        p.add_argument("--superlink", required=True)
        p.add_argument("--ca", required=True)
        p.add_argument("--keys", type=Path, required=True)
        a = p.parse_args(argv[1:])
        return register(a.superlink, a.ca, a.keys)
    if argv[:1] == ["consortium"]:
        return _consortium_main(argv[1:])
    if argv[:1] == ["release"]:
        p = argparse.ArgumentParser(prog="python -m fedmoe.fl_server.provision release")
        p.add_argument("--app", type=Path, default=REPO_ROOT)
        p.add_argument("--out", type=Path, required=True)
        a = p.parse_args(argv[1:])
        staged, digest = release(a.app, a.out)
        print(f"released {staged}\nsha256 {digest}  (banks add this line to config/approved-apps)")
        return 0
    p = argparse.ArgumentParser(prog="python -m fedmoe.fl_server.provision", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("deploy/kits"))
    p.add_argument("--banks", type=int, default=3)
    p.add_argument(
        "--superlink-name",
        action="append",
        default=[],
        help="DNS name or IP the banks use for the SuperLink (repeat; first is the address)",
    )
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--data", action="append", default=[], help="BANK=PATH of the bank's data file (repeat)")
    p.add_argument("--policy", action="append", default=[], help="BANK=PATH of the bank's privacy policy (repeat)")
    p.add_argument("--app", type=Path, default=None, help="app folder to release and pre-approve in bank kits")
    p.add_argument("--no-ckks", action="store_true", help="skip the CKKS key ceremony (run it on a bank host)")
    a = p.parse_args(argv)
    if a.banks < 1:
        p.error("--banks must be at least 1")
    data, policy = _pairs(a.data, "--data"), _pairs(a.policy, "--policy")
    ids = [f"bank-{i}" for i in range(a.banks)]
    unknown = sorted((set(data) | set(policy)) - set(ids))
    if unknown:
        p.error(f"unknown bank(s) {unknown}; banks are {ids}")
    names = a.superlink_name or ["superlink", "localhost", "127.0.0.1"]
    specs = [BankSpec(b, data.get(b, ""), policy.get(b, "")) for b in ids]
    sites = provision(a.out, specs, superlink_names=names, port=a.port, app=a.app, ckks=not a.no_ckks)
    for site, path in sites.items():
        print(f"{site:>10}: {path}")
    print(f"CA private key (keep offline, in no kit): {a.out / 'ca' / 'ca.key'}")
    if not POLICY_EXAMPLE.is_file() and not policy:
        print("note: deploy/bank-policy.example.toml not found; bank kits have no policy.toml")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
