"""The package layering README and docs/architecture.md promise, checked in fresh interpreters."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def loaded_after(statement: str) -> set[str]:
    code = f"import sys\n{statement}\nprint('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_server_round_loads_no_client_code_no_opacus_no_torch():
    modules = loaded_after("import fedmoe.fl_server.federation, fedmoe.fl_server.app, fedmoe.fl_server.state")
    assert not {m for m in modules if m == "opacus" or m.startswith("opacus.")}
    assert not {m for m in modules if m == "fedmoe.fl_client" or m.startswith("fedmoe.fl_client.")}
    assert "torch" not in modules  # the layout is computed lazily, on the meta device


def test_protocol_imports_neither_torch_nor_tenseal():
    modules = loaded_after(
        "import fedmoe.protocol.config, fedmoe.protocol.ledger, fedmoe.protocol.messages, fedmoe.protocol.files, "
        "fedmoe.protocol.accounting"
    )
    assert "torch" not in modules and "tenseal" not in modules
    assert not {m for m in modules if m.startswith(("fedmoe.fl_client", "fedmoe.fl_server", "fedmoe.audit"))}


def test_no_fl_client_import_anywhere_in_fl_server():
    offenders = [
        f"{path.relative_to(ROOT)}:{number}"
        for path in sorted((ROOT / "fedmoe" / "fl_server").rglob("*.py"))
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1)
        if "fl_client" in line
    ]
    assert offenders == []


def test_server_layout_matches_the_banks_built_model():
    from fedmoe.fl_client.task import build_model
    from fedmoe.fl_server.layout import trainable_layout
    from fedmoe.model.trainable import TrainableView
    from fedmoe.protocol.config import JobConfig

    for job in (JobConfig(model_preset="tiny"), JobConfig(model_preset="tiny", train_mode="router+experts")):
        view = TrainableView(build_model(job))
        assert trainable_layout(job) == (view.layout_hash, view.numel)
