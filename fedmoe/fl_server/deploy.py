"""Deployment topology: the exact commands of every Flower process, for loopback and compose.

One function, `service_commands`, says how each process starts; the loopback launcher
(`fedmoe.fl_server.launch`) runs its output on 127.0.0.1, `docker-compose.yml` and every per-site kit of
`fedmoe.fl_server.provision` contain the same commands with their own hosts and paths
(tests/fl_server/test_deploy.py checks it).

Processes (flwr 1.42, `--isolation process`, so apps run in separate executors):
    superlink        flower-superlink: Fleet (/v1/fleet), Control (/v1/control) and Runtime APIs on one port
    serverapp        flower-superexec attached to the SuperLink's Runtime API: runs our ServerApp
    bank-<i>         flower-supernode for bank i, with its node-config (ids, paths, budget, policy)
    bank-<i>-apps    fedmoe-superexec attached to that SuperNode's ClientAppIo API: runs its ClientApps
                     in one warm process (pyproject.toml scripts; docs/architecture.md)
Runtime dependency installation stays off: banks have no internet. With `secure` topologies
(compose, kits, `launch --tls`): TLS, SuperNode authentication (only registered bank keys join),
and a shared secret between each Runtime API and its executor (nobody else can pose as one).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from fedmoe.protocol.config import CONTAINER_UID

# Every Flower process we start gets these: no telemetry (banks have no internet), no update check;
# executors look for a message to run every 0.1 s (Flower's default: 1 s).
FLOWER_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1",
}
# Per service on top of FLOWER_ENV. The ServerApp's executor picks up one task per job, so Flower's
# own 1 s poll is plenty: at 0.1 s its polls were a steady load on the SuperLink for the whole job.
SERVICE_ENV = {"serverapp": {"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "1.0"}}


@dataclass(frozen=True)
class BankNode:
    bank_id: str
    partition_id: int
    state_dir: str
    key_path: str
    data_path: str = ""
    policy_file: str = ""  # the bank's privacy policy (TOML); "" = none
    identity_key: str = ""  # the bank's Ed25519 identity (pinned); "" = the bank's default
    epsilon: float | None = None  # None: the job's default budget
    torch_threads: int = 0  # > 0 when banks share a host (loopback): cores per bank
    auth_key: str = ""  # SuperNode authentication private key (OpenSSH EC); "" = none
    exec_secret: str = ""  # shared secret SuperNode <-> its executor; "" = none


@dataclass(frozen=True)
class Topology:
    """Where processes listen and what each bank mounts; loopback, compose and kits differ only here."""

    banks: tuple[BankNode, ...]
    superlink_host: str  # how others reach the SuperLink
    superlink_bind: str  # where the SuperLink listens
    superlink_port: int = 8000
    supernode_hosts: tuple[str, ...] = ()  # how bank i's executor reaches its SuperNode
    supernode_binds: tuple[str, ...] = ()
    supernode_ports: tuple[int, ...] = ()
    tls_dir: str = ""  # "" = insecure (loopback/dev); else the SuperLink's ca.crt, server.pem, server.key
    ca_cert: str = ""  # the CA certificate clients verify the SuperLink with ("" = {tls_dir}/ca.crt)
    superlink_database: str = ""  # SQLite file: runs and node registrations survive a restart
    supernode_auth: bool = False  # SuperLink accepts only SuperNodes whose public key is registered
    exec_secret: str = ""  # shared secret SuperLink Runtime API <-> ServerApp executor; "" = none
    health_ports: dict[str, int] | None = None  # service -> port of its gRPC health server (no TLS)

    @property
    def superlink_address(self) -> str:
        return f"{self.superlink_host}:{self.superlink_port}"

    @property
    def ca_path(self) -> str:
        return self.ca_cert or (f"{self.tls_dir}/ca.crt" if self.tls_dir else "")


def loopback_topology(
    n_banks: int,
    *,
    root: str,
    key_path: str,
    base_port: int = 8000,
    tls_dir: str = "",
    auth_dir: str = "",
    data_paths: dict[str, str] | None = None,
    policy_files: dict[str, str] | None = None,
) -> Topology:
    """All processes on 127.0.0.1; with `tls_dir` + `auth_dir` the secure variant (`launch --tls`)."""
    threads = max(1, (os.cpu_count() or 1) // max(1, n_banks))  # the banks share this host's cores
    data_paths, policy_files = data_paths or {}, policy_files or {}
    banks = tuple(
        BankNode(
            bank_id=f"bank-{i}",
            partition_id=i,
            state_dir=f"{root}/banks/bank-{i}",
            key_path=key_path,
            data_path=data_paths.get(f"bank-{i}", ""),
            policy_file=policy_files.get(f"bank-{i}", ""),
            torch_threads=threads,
            auth_key=f"{auth_dir}/bank-{i}/node.key" if auth_dir else "",
            exec_secret=f"{auth_dir}/bank-{i}/exec.secret" if auth_dir else "",
        )
        for i in range(n_banks)
    )
    names = ["superlink", "serverapp", *(s for i in range(n_banks) for s in (f"bank-{i}", f"bank-{i}-apps"))]
    return Topology(
        banks=banks,
        superlink_host="127.0.0.1",
        superlink_bind="127.0.0.1",
        superlink_port=base_port,
        supernode_hosts=("127.0.0.1",) * n_banks,
        supernode_binds=("127.0.0.1",) * n_banks,
        supernode_ports=tuple(base_port + 100 + i for i in range(n_banks)),
        tls_dir=tls_dir,
        superlink_database=f"{root}/superlink.db",
        supernode_auth=bool(auth_dir),
        exec_secret=f"{auth_dir}/server/exec.secret" if auth_dir else "",
        health_ports={name: base_port + 200 + j for j, name in enumerate(names)},
    )


# In a container every service has its own network namespace: fixed ports, paths under /run/secrets.
SECRETS = "/run/secrets"
HEALTH_PORT = 9098
CLIENTAPPIO_PORT = 9094


def container_bank(i: int, *, data_path: str = "", policy_file: str = "", partition_id: int | None = None) -> BankNode:
    """Bank i as its containers see it: volumes /state, /keys (its secret only), /data; secrets."""
    return BankNode(
        bank_id=f"bank-{i}",
        partition_id=i if partition_id is None else partition_id,
        state_dir="/state",
        key_path="/keys/context.secret.ckks",
        identity_key=f"/keys/bank-{i}.identity.secret",
        data_path=data_path,
        policy_file=policy_file,
        auth_key=f"{SECRETS}/node-key",
        exec_secret=f"{SECRETS}/exec-secret",
    )


# The bank's kit config folder is mounted read-only at /etc/fedmoe in its executor.
POLICY_PATH = "/etc/fedmoe/policy.toml"


def compose_topology(n_banks: int, *, tls: bool = True, banks: tuple[BankNode, ...] | None = None) -> Topology:
    """Every process in its own container; bank i and its executor share a private network `bank-i`."""
    banks = banks if banks is not None else tuple(container_bank(i, policy_file=POLICY_PATH) for i in range(n_banks))
    n_banks = len(banks)
    return Topology(
        banks=banks,
        superlink_host="superlink",
        superlink_bind="0.0.0.0",
        # The executor reaches its SuperNode by name on the bank's own network (no other container
        # is on it), authenticated by the shared secret; a restarted SuperNode is found again.
        supernode_hosts=tuple(b.bank_id for b in banks),
        supernode_binds=("0.0.0.0",) * n_banks,
        supernode_ports=(CLIENTAPPIO_PORT,) * n_banks,
        tls_dir=SECRETS if tls else "",
        ca_cert=f"{SECRETS}/ca-cert" if tls else "",
        superlink_database="/state/superlink.db",
        supernode_auth=tls,  # Flower allows SuperNode authentication only over TLS
        exec_secret=f"{SECRETS}/exec-secret",
        health_ports={"*": HEALTH_PORT},
    )


def _node_config(bank: BankNode) -> str:
    pairs: dict[str, object] = {
        "bank-id": bank.bank_id,
        "partition-id": bank.partition_id,
        "state-dir": bank.state_dir,
        "key-path": bank.key_path,
    }
    if bank.data_path:
        pairs["data-path"] = bank.data_path
    if bank.policy_file:
        pairs["policy-file"] = bank.policy_file
    if bank.identity_key:
        pairs["identity-key"] = bank.identity_key
    if bank.epsilon is not None:
        pairs["epsilon"] = bank.epsilon
    if bank.torch_threads:
        pairs["torch-threads"] = bank.torch_threads
    return " ".join(f"{k}='{v}'" if isinstance(v, str) else f"{k}={v}" for k, v in pairs.items())


def executor_env(bank: BankNode) -> dict[str, str]:
    """A bank executor's environment: its node-config, checked by fedmoe-superexec when it starts."""
    return {"FEDMOE_NODE_CONFIG": _node_config(bank)}


def _health(topo: Topology, name: str) -> list[str]:
    ports = topo.health_ports or {}
    port = ports.get(name, ports.get("*"))
    if port is None:
        return []
    return ["--health-server-address", f"127.0.0.1:{port}"]  # probed from inside the host/container


def service_commands(topo: Topology) -> dict[str, list[str]]:
    """Service name -> argv of every process of the deployment, in start order."""
    tls = topo.tls_dir
    server_tls = (
        ["--ssl-certfile", f"{tls}/server.pem", "--ssl-keyfile", f"{tls}/server.key", "--ssl-ca-certfile", topo.ca_path]
        if tls
        else ["--insecure"]
    )
    client_tls = ["--root-certificates", topo.ca_path] if tls else ["--insecure"]
    server_secret = ["--superexec-auth-secret-file", topo.exec_secret] if topo.exec_secret else []
    commands: dict[str, list[str]] = {
        "superlink": [
            "flower-superlink",
            *server_tls,
            *(["--enable-supernode-auth"] if topo.supernode_auth else []),
            *server_secret,
            "--isolation",
            "process",
            "--disable-runtime-dependency-installation",
            "--database",
            topo.superlink_database,
            "--host",
            topo.superlink_bind,
            "--port",
            str(topo.superlink_port),
            *_health(topo, "superlink"),
        ],
        "serverapp": [
            "flower-superexec",
            *client_tls,
            *server_secret,
            "--runtime-api-address",
            topo.superlink_address,
            *_health(topo, "serverapp"),
        ],
    }
    for i, bank in enumerate(topo.banks):
        commands.update(_bank_commands(topo, i, bank, client_tls))
    return commands


def _bank_commands(topo: Topology, i: int, bank: BankNode, client_tls: list[str]) -> dict[str, list[str]]:
    """A bank's two processes: its SuperNode and its ClientApp executor."""
    bank_secret = ["--superexec-auth-secret-file", bank.exec_secret] if bank.exec_secret else []
    supernode = [
        "fedmoe-supernode",  # flower-supernode polling every 0.5 s instead of 3 s (pyproject scripts)
        *client_tls,
        *(["--auth-supernode-private-key", bank.auth_key] if bank.auth_key else []),
        *bank_secret,
        "--superlink",
        topo.superlink_address,
        "--isolation",
        "process",
        "--host",
        topo.supernode_binds[i],
        "--port",
        str(topo.supernode_ports[i]),
        "--node-config",
        _node_config(bank),
        *_health(topo, bank.bank_id),
    ]
    executor = [
        "fedmoe-superexec",  # flower-superexec running ClientApps in one warm process (pyproject scripts)
        "--insecure",  # executor <-> its own SuperNode: loopback, or the bank's private network
        *bank_secret,
        "--runtime-api-address",
        f"{topo.supernode_hosts[i]}:{topo.supernode_ports[i]}",
        *_health(topo, f"{bank.bank_id}-apps"),
    ]
    return {bank.bank_id: supernode, f"{bank.bank_id}-apps": executor}


def simulation_command(topo: Topology) -> list[str]:
    """A SuperLink that simulates the banks itself (Ray backend): `flwr run ... --federation-config
    "num-supernodes=N"`. Same flags as the deployment's SuperLink, plus --simulation and the
    default subprocess isolation (it runs the ServerApp and the simulated ClientApps itself)."""
    argv = service_commands(topo)["superlink"]
    i = argv.index("--isolation")
    return [argv[0], "--simulation", *argv[1:i], *argv[i + 2 :]]


# ---- docker-compose ---------------------------------------------------------------------------
IMAGE = "fedmoe:latest"
UID = CONTAINER_UID  # the image's non-root user (deploy/Dockerfile)
# Where the kits mount the keys and the server's state in the serverapp container: a job under a kit uses these.
CONTAINER_RUN_CONFIG = {"key-dir": "/keys", "server-state-dir": "/state/server"}
COMPOSE_RUN_CONFIG = " ".join(f'{k}="{v}"' for k, v in CONTAINER_RUN_CONFIG.items())
KITS = "./deploy/kits"  # where `python -m fedmoe.fl_server.provision` writes the kits the one-host file uses


# What each side of the ceremony keeps (fedmoe.fl_server.ceremony writes all of it into one folder).
BANK_KEY_FILES = ("context.secret.ckks", "context.secret.bfv", "pins.json")  # + its own identity
SERVER_KEY_FILES = ("context.public.ckks", "key.json", "context.public.bfv", "bfv-key.json", "pins.json")


def _keygen_command(n_banks: int) -> list[str]:
    """One-shot ceremony: secrets only into bank key volumes, public parts only into the server's.

    fedmoe.fl_server.ceremony makes the CKKS and BFV key pairs, one Ed25519 identity per bank and the
    pins file in a tmpfs, so no secret lands anywhere but the banks' volumes; each bank gets the
    shared CKKS/BFV secrets, the pins and its own identity only, `install -m 600 -o 10001` keeps
    them private to the services' user. A second `up` finds the keys and does nothing.
    """
    own = f"-o {UID} -g {UID}"
    banks = ", ".join(f"'bank-{i}'" for i in range(n_banks))
    steps = [
        "test -f /out/server/context.public.ckks && echo 'keys exist; nothing to do' && exit 0",
        'python -c "from fedmoe.fl_server.ceremony import loopback_ceremony; '
        f"loopback_ceremony('/ceremony', [{banks}])\"",
    ]
    for i in range(n_banks):
        files = " ".join(f"/ceremony/{f}" for f in (*BANK_KEY_FILES, f"bank-{i}.identity.secret"))
        steps.append(f"install {own} -m 600 {files} /out/bank-{i}/")
    steps.append(f"install {own} -m 644 {' '.join(f'/ceremony/{f}' for f in SERVER_KEY_FILES)} /out/server/")
    return ["sh", "-ec", f"{steps[0]}; " + " && ".join(steps[1:])]


def _register_command(address: str, ca: str) -> list[str]:
    """One-shot, operator side: registers every bank public key the SuperLink does not know yet."""
    return [
        "python",
        "-m",
        "fedmoe.fl_server.provision",
        "register",
        "--superlink",
        address,
        "--ca",
        ca,
        "--keys",
        "/etc/fedmoe/supernodes",
    ]


SUPERNODE_ALIVE_FILE = "/tmp/fedmoe-supernode.alive"  # touched after every pull that reached the SuperLink


def _tcp_check(port: int) -> dict:
    """Healthy when the process's health server (or API) accepts a TCP connection."""
    probe = f"import socket; socket.create_connection(('127.0.0.1', {port}), 3).close()"
    return {
        "test": ["CMD", "python", "-c", probe],
        "interval": "10s",
        "timeout": "5s",
        "retries": 6,
        "start_period": "20s",
    }


def _secret(name: str, target: str) -> dict:
    return {"source": name, "target": target}


def _flower_service(argv: list[str], **extra) -> dict:
    return {
        "image": "${FEDMOE_IMAGE:-" + IMAGE + "}",
        "command": argv,
        "user": f"{UID}:{UID}",
        "environment": dict(FLOWER_ENV),
        "restart": "unless-stopped",
        "healthcheck": _tcp_check(HEALTH_PORT),
        "read_only": True,
        "tmpfs": ["/tmp", f"/home/fedmoe:uid={UID},gid={UID},mode=0700"],
        "security_opt": ["no-new-privileges:true"],
        "cap_drop": ["ALL"],
        **extra,
    }


def server_services(topo: Topology, *, publish: str, secrets_dir: str, keys: str, state: str) -> tuple[dict, dict]:
    """superlink + serverapp + register (compose services) and the secrets they read."""
    commands = service_commands(topo)
    services = {
        "superlink": _flower_service(
            commands["superlink"],
            ports=[f"{publish}:{topo.superlink_port}"],
            volumes=[f"{state}:/state"],
            secrets=[
                _secret("ca-cert", "ca-cert"),
                _secret("superlink-cert", "server.pem"),
                _secret("superlink-key", "server.key"),
                _secret("server-exec-secret", "exec-secret"),
            ],
            # The serverapp and register reach the SuperLink by the name in its certificate (the kit's
            # --superlink-name, e.g. fl.consortium.example): on the internal server network that name
            # must be this container, not whatever public DNS says (the internal network has no route out).
            networks=(
                ["fleet", "server"]
                if topo.superlink_host == "superlink"
                else {"fleet": {}, "server": {"aliases": [topo.superlink_host]}}
            ),
        ),
        "serverapp": _flower_service(
            commands["serverapp"],
            environment={**FLOWER_ENV, **SERVICE_ENV["serverapp"]},
            depends_on={"superlink": {"condition": "service_healthy"}},
            volumes=[f"{keys}:/keys:ro", f"{state}:/state"],
            secrets=[_secret("ca-cert", "ca-cert"), _secret("server-exec-secret", "exec-secret")],
            networks=["server"],
        ),
        "register": {
            **_flower_service(
                _register_command(topo.superlink_address, f"{SECRETS}/ca-cert"),
                depends_on={"superlink": {"condition": "service_healthy"}},
                volumes=[f"{secrets_dir}/supernodes:/etc/fedmoe/supernodes:ro"],
                secrets=[_secret("ca-cert", "ca-cert")],
                networks=["server"],
            ),
            "restart": "on-failure",
        },
    }
    del services["register"]["healthcheck"]
    secrets = {
        "ca-cert": {"file": f"{secrets_dir}/secrets/ca.crt"},
        "superlink-cert": {"file": f"{secrets_dir}/secrets/server.pem"},
        "superlink-key": {"file": f"{secrets_dir}/secrets/server.key"},
        "server-exec-secret": {"file": f"{secrets_dir}/secrets/exec.secret"},
    }
    return services, secrets


def bank_services(
    topo: Topology, i: int, *, kit: str, keys: str, state: str, data: str | None, depends: dict | None = None
) -> tuple[dict, dict]:
    """bank-i (SuperNode) + bank-i-apps (its executor, the only one with keys and data)."""
    commands = service_commands(topo)
    name = topo.banks[i].bank_id
    net = f"{name}-net"
    supernode = _flower_service(
        commands[name],
        # Healthy only while its pulls reach the SuperLink (fedmoe-supernode touches its alive file): never
        # "healthy" before it connected or after it gave up.
        environment={**FLOWER_ENV, "FEDMOE_SUPERNODE_ALIVE": SUPERNODE_ALIVE_FILE},
        healthcheck={**_tcp_check(HEALTH_PORT), "test": ["CMD", "fedmoe-supernode", "--alive-within", "30"]},
        secrets=[
            _secret("ca-cert", "ca-cert"),
            _secret(f"{name}-node-key", "node-key"),
            _secret(f"{name}-exec-secret", "exec-secret"),
        ],
        networks=["fleet", net],
        **({"depends_on": depends} if depends else {}),
    )
    volumes = [f"{keys}:/keys:ro", f"{state}:/state", f"{kit}/config:/etc/fedmoe:ro"]
    if data:
        volumes.append(f"{data}:/data:ro")
    executor = _flower_service(
        commands[f"{name}-apps"],
        environment={**FLOWER_ENV, "FEDMOE_APPROVED_APPS": "/etc/fedmoe/approved-apps", **executor_env(topo.banks[i])},
        # The ClientApp runs here: it alone reads the bank's secret context, data and state. Its
        # only network is the bank's own (internal: no route out); its SuperNode is found by name
        # there, so a restarted SuperNode is reached again.
        # Started, not healthy: the SuperNode is healthy only once its pulls reach the SuperLink, and a
        # bank that came up before the SuperLink had `docker-compose up -d` exit 1 ("Container ... is
        # unhealthy") with no executor at all, still none after the SuperLink came (walked with Docker).
        depends_on={name: {"condition": "service_started"}},
        volumes=volumes,
        secrets=[_secret(f"{name}-exec-secret", "exec-secret")],
        networks=[net],
    )
    secrets = {
        f"{name}-node-key": {"file": f"{kit}/secrets/node.key"},
        f"{name}-exec-secret": {"file": f"{kit}/secrets/exec.secret"},
    }
    return {name: supernode, f"{name}-apps": executor}, secrets


def compose_spec(n_banks: int = 3, *, kits: str = KITS) -> dict:
    """The one-host federation (simulating n banks on one Docker host), TLS and SuperNode auth on.

    Built from `service_commands` like the per-site kits; secrets come from the kits
    `python -m fedmoe.fl_server.provision --out deploy/kits` writes. Banks use their slice of the
    synthetic corpus (no data-path): a real bank's kit sets one.
    """
    topo = compose_topology(n_banks)
    services: dict[str, dict] = {
        "keygen": {
            "image": "${FEDMOE_IMAGE:-" + IMAGE + "}",
            "build": {"context": ".", "dockerfile": "deploy/Dockerfile"},
            "user": "0:0",  # one-shot ceremony: hands the files to the services' user (UID)
            "environment": dict(FLOWER_ENV),
            "command": _keygen_command(n_banks),
            "tmpfs": ["/ceremony"],
            "network_mode": "none",
            "volumes": [*(f"bank-{i}-keys:/out/bank-{i}" for i in range(n_banks)), "server-keys:/out/server"],
        },
    }
    server, secrets = server_services(
        topo,
        publish="127.0.0.1:${FEDMOE_PORT:-8000}",
        secrets_dir=f"{kits}/server",
        keys="server-keys",
        state="server-state",
    )
    server["serverapp"]["depends_on"]["keygen"] = {"condition": "service_completed_successfully"}
    services.update(server)
    networks: dict[str, dict] = {"fleet": {}, "server": {"internal": True}}
    for i, bank in enumerate(topo.banks):
        name = bank.bank_id
        more, bank_secrets = bank_services(
            topo,
            i,
            kit=f"{kits}/{name}",
            keys=f"{name}-keys",
            state=f"{name}-state",
            data=None,
            depends={"register": {"condition": "service_completed_successfully"}},
        )
        more[f"{name}-apps"]["depends_on"]["keygen"] = {"condition": "service_completed_successfully"}
        services.update(more)
        secrets.update(bank_secrets)
        networks[f"{name}-net"] = {"internal": True}
    volumes = ["server-keys", "server-state"]
    for bank in topo.banks:
        volumes += [f"{bank.bank_id}-{kind}" for kind in ("keys", "state")]
    return {
        "version": "3.8",
        "services": services,
        "networks": networks,
        "volumes": {v: {} for v in volumes},
        "secrets": secrets,
    }


def render_yaml(header: str, spec: dict) -> str:
    import yaml

    return header + yaml.safe_dump(spec, sort_keys=False, width=120)


def render_compose(n_banks: int = 3) -> str:
    header = (
        f"# fedmoe federation on one Docker host: SuperLink + ServerApp executor + {n_banks} banks, TLS,\n"
        "# SuperNode authentication, banks run only approved app bundles, non-root, no telemetry.\n"
        "# Generated by `python -m fedmoe.fl_server.deploy compose`; the commands are\n"
        "# fedmoe.fl_server.deploy.service_commands, the same the loopback launcher and the per-site kits\n"
        "# run (a test checks). Needs the kits first:\n"
        "#   make provision   (= python -m fedmoe.fl_server.provision --out deploy/kits --banks 3 ...)\n"
        "# Then: docker-compose up -d; flwr run <release app dir> <connection to 127.0.0.1:8000 with\n"
        f"# root-certificates deploy/kits/server/secrets/ca.crt> --run-config '{COMPOSE_RUN_CONFIG}'\n"
        "# `make compose-test` does all of it. Networks: with dockerd --bridge=none, user-defined networks\n"
        "# (these) still work; the SuperLink port is published on 127.0.0.1 only (operator side).\n"
    )
    return render_yaml(header, compose_spec(n_banks))


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m fedmoe.fl_server.deploy")
    p.add_argument("what", choices=["compose"])
    p.add_argument("--banks", type=int, default=3)
    args = p.parse_args(argv)
    print(render_compose(args.banks), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
