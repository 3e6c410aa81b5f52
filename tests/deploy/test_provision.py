"""Per-site kits: each bank's folder holds the CA certificate and its own keys, never another
party's private key; the server kit holds only bank public keys; node-config carries data/policy."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fedmoe.fl_server.provision import BankSpec, main, provision

PRIVATE_MARKERS = (b"PRIVATE KEY", b"FMIDKEY1")  # PEM/OpenSSH private keys, fedmoe.crypto.identity secrets


def private_files(root: Path) -> dict[str, bytes]:
    """Every file under `root` that holds private key material, by relative path."""
    out = {}
    for path in root.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            if any(m in data for m in PRIVATE_MARKERS) or ".secret" in path.name or path.name == "ca.key":
                out[str(path.relative_to(root))] = data
    return out


@pytest.fixture(scope="module")
def kits(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("kits")
    data = out.parent / "bank0-train.jsonl"
    data.write_text('{"text": "hello"}\n')
    policy = out.parent / "bank1-policy.toml"
    policy.write_text("max-epsilon = 4.0\n")
    banks = [BankSpec("bank-0", data_file=str(data)), BankSpec("bank-1", policy_file=str(policy)), BankSpec("bank-2")]
    provision(out, banks, superlink_names=["fl.example.org", "10.0.0.5"], port=8443)
    return out


def test_bank_kit_holds_no_private_key_but_its_own(kits):
    everyone = {site: private_files(kits / site) for site in ("server", "bank-0", "bank-1", "bank-2")}
    ca_key = (kits / "ca" / "ca.key").read_bytes()
    server_key = (kits / "server" / "secrets" / "server.key").read_bytes()
    for i in range(3):
        bank = f"bank-{i}"
        mine = everyone[bank]
        assert set(mine) == {
            "secrets/node.key",
            "secrets/exec.secret",
            f"keys/{bank}.identity.secret",
            "keys/context.secret.ckks",
            "keys/context.secret.bfv",
        }, sorted(mine)
        blobs = [p.read_bytes() for p in (kits / bank).rglob("*") if p.is_file()]
        assert not any(ca_key in b or server_key in b for b in blobs)
        for j in range(3):
            if j == i:
                continue
            other = everyone[f"bank-{j}"]
            for name in ("secrets/node.key", "secrets/exec.secret", f"keys/bank-{j}.identity.secret"):
                assert not any(other[name] in b for b in blobs), f"{bank} holds bank-{j}'s {name}"
        assert (kits / bank / "secrets" / "ca.crt").read_bytes() == (kits / "ca" / "ca.crt").read_bytes()
        assert (kits / bank / "README.md").read_text().count("docker-compose") >= 3


def test_server_kit_gets_public_material_only_from_banks(kits):
    server = private_files(kits / "server")
    assert set(server) <= {"secrets/server.key", "secrets/exec.secret"}, sorted(server)
    assert sorted(p.name for p in (kits / "server" / "supernodes").iterdir()) == [f"bank-{i}.pub" for i in range(3)]
    assert sorted(p.name for p in (kits / "server" / "keys").iterdir()) == sorted(
        ["context.public.ckks", "key.json", "context.public.bfv", "bfv-key.json", "pins.json"]
    )


def test_kit_compose_files_carry_node_config_and_auth(kits):
    for i in range(3):
        spec = yaml.safe_load((kits / f"bank-{i}" / "docker-compose.yml").read_text())
        assert set(spec["services"]) == {f"bank-{i}", f"bank-{i}-apps"}
        cmd = spec["services"][f"bank-{i}"]["command"]
        assert cmd[cmd.index("--superlink") + 1] == "fl.example.org:8443"
        assert "--auth-supernode-private-key" in cmd
        node_config = cmd[cmd.index("--node-config") + 1]
        assert f"bank-id='bank-{i}'" in node_config
        assert f"identity-key='/keys/bank-{i}.identity.secret'" in node_config
        if i == 0:
            assert "data-path='/data/bank0-train.jsonl'" in node_config
            assert (kits / "bank-0" / "data" / "bank0-train.jsonl").exists()
        if i == 1:
            assert "policy-file='/etc/fedmoe/policy.toml'" in node_config
            assert (kits / "bank-1" / "config" / "policy.toml").read_text() == "max-epsilon = 4.0\n"
        for secret in spec["secrets"].values():
            assert secret["file"].startswith("./secrets/") and (kits / f"bank-{i}" / secret["file"]).exists()
    server = yaml.safe_load((kits / "server" / "docker-compose.yml").read_text())
    assert "--enable-supernode-auth" in server["services"]["superlink"]["command"]


def test_server_certificate_names_the_superlink(kits):
    from cryptography import x509

    cert = x509.load_pem_x509_certificate((kits / "server" / "secrets" / "server.pem").read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "fl.example.org" in sans.get_values_for_type(x509.DNSName)
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["10.0.0.5"]


def test_cli_refuses_unknown_bank(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path), "--banks", "2", "--data", "bank-5=/x"])
    assert "bank-5" in capsys.readouterr().err


def test_serverapp_reaches_the_superlink_by_its_certificate_name(kits):
    """Walked with Docker: a kit provisioned for fl.example.org had the serverapp and register dial
    fl.example.org:8443 from the internal server network, where no DNS name resolves to the SuperLink
    (and no route out exists). The SuperLink container answers to that name there (a network alias)."""
    server = yaml.safe_load((kits / "server" / "docker-compose.yml").read_text())
    services = server["services"]
    assert services["superlink"]["networks"]["server"]["aliases"] == ["fl.example.org"]
    assert "fl.example.org:8443" in services["serverapp"]["command"]
    assert services["serverapp"]["networks"] == ["server"]
