"""The secure-aggregation round keeps the server's promises: no bank code, no secret-key code, no torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_server_secagg_round_loads_no_bank_no_secret_key_code_no_torch():
    code = (
        "import sys, fedmoe.fl_server.secagg_round, fedmoe.fl_server.federation, fedmoe.fl_server.app\n"
        "print('\\n'.join(sys.modules))"
    )
    modules = set(
        subprocess.run(
            [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.split()
    )
    assert "fedmoe.crypto.secagg.server" in modules
    forbidden = {
        "torch",
        "opacus",
        "fedmoe.crypto.secagg.bank",
        "fedmoe.crypto.secagg.bfv_secret",
        "fedmoe.crypto.secagg.ceremony",
    }
    assert not forbidden & modules, forbidden & modules
    assert not {m for m in modules if m.startswith("fedmoe.fl_client")}


def test_bank_app_loads_torch_only_for_the_stages_that_train():
    # Flower starts a ClientApp process per message: the four light secagg stages must not pay for torch
    code = "import sys, fedmoe.fl_client.app\nprint('\\n'.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    modules = set(out.stdout.split())
    assert "fedmoe.fl_client.secagg_bank" in modules and "fedmoe.crypto.secagg.bank" in modules
    assert not {"torch", "opacus", "fedmoe.fl_client.bank", "fedmoe.model.trainable"} & modules
