"""Deployment topology: the exact commands of every Flower process, for loopback and compose.

One function, `service_commands`, says how each process starts; the loopback launcher
(`fl_server.launch`) runs its output on 127.0.0.1 and `docker-compose.yml` must contain the same
commands with the compose topology's hosts and paths (tests/fl_server/test_deploy.py checks it).

Processes (flwr 1.42, `--isolation process`, so apps run in separate executors):
    superlink        flower-superlink: Fleet, Control and Runtime APIs on one HTTP port
    serverapp        flower-superexec attached to the SuperLink's Runtime API: runs our ServerApp
    bank-<i>         flower-supernode for bank i, with its node-config (ids, paths, budget)
    bank-<i>-apps    flower-superexec attached to that SuperNode's ClientAppIo API: runs ClientApps
Runtime dependency installation stays off: banks have no internet.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class BankNode:
    bank_id: str
    partition_id: int
    state_dir: str
    key_path: str
    data_path: str = ""
    epsilon: float | None = None  # None: the job's default budget
    torch_threads: int = 0  # > 0 when banks share a host (loopback): cores per bank


@dataclass(frozen=True)
class Topology:
    """Where processes listen and what each bank mounts; loopback and compose differ only here."""

    banks: tuple[BankNode, ...]
    superlink_host: str  # how others reach the SuperLink
    superlink_bind: str  # where the SuperLink listens
    superlink_port: int = 8000
    supernode_hosts: tuple[str, ...] = ()  # how bank i's executor reaches its SuperNode
    supernode_binds: tuple[str, ...] = ()
    supernode_ports: tuple[int, ...] = ()
    tls_dir: str = ""  # "" = insecure (loopback/dev); else ca.crt, server.pem, server.key inside
    superlink_database: str = ""  # SQLite file: runs and node registrations survive a restart

    @property
    def superlink_address(self) -> str:
        return f"{self.superlink_host}:{self.superlink_port}"


def loopback_topology(n_banks: int, *, root: str, key_path: str, base_port: int = 8000, tls_dir: str = "") -> Topology:
    threads = max(1, (os.cpu_count() or 1) // n_banks)  # the banks share this host's cores
    banks = tuple(
        BankNode(
            bank_id=f"bank-{i}",
            partition_id=i,
            state_dir=f"{root}/banks/bank-{i}",
            key_path=key_path,
            torch_threads=threads,
        )
        for i in range(n_banks)
    )
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
    )


def compose_topology(n_banks: int, *, tls: bool = False) -> Topology:
    """Every bank in its own container with volumes /state, /keys (its secret only), /data."""
    banks = tuple(
        BankNode(bank_id=f"bank-{i}", partition_id=i, state_dir="/state", key_path="/keys/context.secret.ckks")
        for i in range(n_banks)
    )
    return Topology(
        banks=banks,
        superlink_host="superlink",
        superlink_bind="0.0.0.0",
        # Each bank's executor shares its SuperNode's network namespace (network_mode
        # "service:bank-i"), so ClientAppIo listens on loopback only: no other container can
        # reach it and pose as the bank's executor.
        supernode_hosts=("127.0.0.1",) * n_banks,
        supernode_binds=("127.0.0.1",) * n_banks,
        supernode_ports=(9094,) * n_banks,
        tls_dir="/certs" if tls else "",
        superlink_database="/state/superlink.db",
    )


def _node_config(bank: BankNode) -> str:
    pairs = {
        "bank-id": bank.bank_id,
        "partition-id": bank.partition_id,
        "state-dir": bank.state_dir,
        "key-path": bank.key_path,
    }
    if bank.data_path:
        pairs["data-path"] = bank.data_path
    if bank.epsilon is not None:
        pairs["epsilon"] = bank.epsilon
    if bank.torch_threads:
        pairs["torch-threads"] = bank.torch_threads
    return " ".join(f"{k}='{v}'" if isinstance(v, str) else f"{k}={v}" for k, v in pairs.items())


def service_commands(topo: Topology) -> dict[str, list[str]]:
    """Service name -> argv of every process of the deployment, in start order."""
    tls = topo.tls_dir
    server_tls = (
        [
            "--ssl-certfile",
            f"{tls}/server.pem",
            "--ssl-keyfile",
            f"{tls}/server.key",
            "--ssl-ca-certfile",
            f"{tls}/ca.crt",
        ]
        if tls
        else ["--insecure"]
    )
    client_tls = ["--root-certificates", f"{tls}/ca.crt"] if tls else ["--insecure"]
    commands: dict[str, list[str]] = {
        "superlink": [
            "flower-superlink",
            *server_tls,
            "--isolation",
            "process",
            "--disable-runtime-dependency-installation",
            "--database",
            topo.superlink_database,
            "--host",
            topo.superlink_bind,
            "--port",
            str(topo.superlink_port),
        ],
        "serverapp": ["flower-superexec", *client_tls, "--runtime-api-address", topo.superlink_address],
    }
    for i, bank in enumerate(topo.banks):
        commands[bank.bank_id] = [
            "flower-supernode",
            *client_tls,
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
        ]
        commands[f"{bank.bank_id}-apps"] = [
            "flower-superexec",
            "--insecure",  # executor <-> its own SuperNode: loopback of one host / network namespace
            "--runtime-api-address",
            f"{topo.supernode_hosts[i]}:{topo.supernode_ports[i]}",
        ]
    return commands


def simulation_command(topo: Topology) -> list[str]:
    """A SuperLink that simulates the banks itself (Ray backend): `flwr run ... --federation-config
    "num-supernodes=N"`. Same flags as the deployment's SuperLink, plus --simulation and the
    default subprocess isolation (it runs the ServerApp and the simulated ClientApps itself)."""
    argv = service_commands(topo)["superlink"]
    i = argv.index("--isolation")
    return [argv[0], "--simulation", *argv[1:i], *argv[i + 2 :]]


# ---- docker-compose ---------------------------------------------------------------------------
IMAGE = "fedmoe:latest"
COMPOSE_RUN_CONFIG = 'key-dir="/keys" server-state-dir="/state/server"'


def _keygen_command(n_banks: int) -> list[str]:
    """One-shot ceremony: secret only into bank key volumes, public only into the server's.

    The ceremony folder is a tmpfs, so the secret never lands anywhere but the banks' volumes;
    `install -m 600` keeps the files private. A second `up` finds the keys and does nothing.
    """
    steps = [
        "test -f /out/server/context.public.ckks && echo 'keys exist; nothing to do' && exit 0",
        "python -m crypto keygen --out /ceremony",
        *[f"install -m 600 /ceremony/context.secret.ckks /out/bank-{i}/" for i in range(n_banks)],
        "install -m 600 /ceremony/context.public.ckks /out/server/",
        "install -m 644 /ceremony/key.json /out/server/",
    ]
    return ["sh", "-ec", f"{steps[0]}; " + " && ".join(steps[1:])]


def compose_spec(n_banks: int = 3, *, tls: bool = False) -> dict:
    """The docker-compose document: one container per process of `service_commands`."""
    topo = compose_topology(n_banks, tls=tls)
    commands = service_commands(topo)
    certs = ["./deploy/certs:/certs:ro"] if tls else []
    base = {"image": IMAGE, "restart": "on-failure"}
    services: dict[str, dict] = {
        "keygen": {
            "image": IMAGE,
            "build": {"context": ".", "dockerfile": "deploy/Dockerfile"},
            "command": _keygen_command(n_banks),
            "tmpfs": ["/ceremony"],
            "volumes": [*(f"bank-{i}-keys:/out/bank-{i}" for i in range(n_banks)), "server-keys:/out/server"],
        },
        "superlink": {
            **base,
            "command": commands["superlink"],
            "ports": [f"{topo.superlink_port}:{topo.superlink_port}"],
            "volumes": ["server-state:/state", *certs],
        },
        "serverapp": {
            **base,
            "command": commands["serverapp"],
            "depends_on": {
                "superlink": {"condition": "service_started"},
                "keygen": {"condition": "service_completed_successfully"},
            },
            "volumes": ["server-keys:/keys:ro", "server-state:/state", *certs],
        },
    }
    for bank in topo.banks:
        name = bank.bank_id
        services[name] = {
            **base,
            "command": commands[name],
            "depends_on": {"superlink": {"condition": "service_started"}},
            "volumes": [*certs],
        }
        services[f"{name}-apps"] = {
            **base,
            "command": commands[f"{name}-apps"],
            "network_mode": f"service:{name}",
            "depends_on": {
                name: {"condition": "service_started"},
                "keygen": {"condition": "service_completed_successfully"},
            },
            # The ClientApp runs here: it alone reads the bank's secret context, data and state.
            "volumes": [f"{name}-keys:/keys:ro", f"{name}-state:/state", f"{name}-data:/data:ro"],
        }
        if not certs:
            del services[name]["volumes"]
    volumes = ["server-keys", "server-state"]
    for bank in topo.banks:
        volumes += [f"{bank.bank_id}-{kind}" for kind in ("keys", "state", "data")]
    return {"version": "3.8", "services": services, "volumes": {v: {} for v in volumes}}


def render_compose(n_banks: int = 3, *, tls: bool = False) -> str:
    import yaml

    variant = "TLS variant (certificates from deploy/gen_certs.sh)" if tls else "insecure (dev) variant"
    header = (
        f"# fedmoe federation: SuperLink + ServerApp executor + {n_banks} banks, {variant}.\n"
        f"# Generated by `python -m fl_server.deploy compose{' --tls' if tls else ''}`; the commands are\n"
        "# fl_server.deploy.service_commands, the same the loopback launcher runs (a test checks).\n"
        f"# Then: flwr run . <connection to localhost:8000> --run-config '{COMPOSE_RUN_CONFIG}'\n"
    )
    return header + yaml.safe_dump(compose_spec(n_banks, tls=tls), sort_keys=False, width=120)


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m fl_server.deploy")
    p.add_argument("what", choices=["compose"])
    p.add_argument("--banks", type=int, default=3)
    p.add_argument("--tls", action="store_true")
    args = p.parse_args(argv)
    print(render_compose(args.banks, tls=args.tls), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
