"""A hostile bank for the loopback tests (tests/fl_server/test_hostile_loopback.py); no production change.

This folder goes first on PYTHONPATH of every Flower process the test starts, so Python imports
this module at start-up. It does nothing unless FEDMOE_HOSTILE_BANK is set; then, once
`fedmoe.fl_client.secagg_bank` is imported (in a ClientApp process), `SecAggSealer.seal` of the bank whose
node-config bank id equals FEDMOE_HOSTILE_BANK (read at call time: every process sees the same
environment) masks its delta multiplied by FEDMOE_HOSTILE_FACTOR in the rounds listed in
FEDMOE_HOSTILE_ROUNDS (comma separated; empty = every round). Its masked input is otherwise valid:
signed receipt, correct masks, correct weight 1 -- only its values are poisoned. Each poisoned
seal appends a JSON line to FEDMOE_HOSTILE_LOG (bank, round, factor, where fl_client came from).
"""

from __future__ import annotations

import os
import sys

TARGET_MODULE = "fedmoe.fl_client.secagg_bank"


def _patch(module) -> None:
    import json

    from fedmoe import fl_client

    bank_id = os.environ["FEDMOE_HOSTILE_BANK"]
    factor = float(os.environ.get("FEDMOE_HOSTILE_FACTOR", "1e6"))
    rounds = {int(r) for r in os.environ.get("FEDMOE_HOSTILE_ROUNDS", "").split(",") if r.strip()}
    honest_seal = module.SecAggSealer.seal

    def seal(self, bank, round_idx, delta):
        if self.config.bank_id == bank_id and (not rounds or round_idx in rounds):
            delta = delta * factor
            log = os.environ.get("FEDMOE_HOSTILE_LOG")
            if log:
                line = {"bank": bank_id, "round": round_idx, "factor": factor, "fl_client": fl_client.__file__}
                with open(log, "a", encoding="utf-8") as f:
                    f.write(json.dumps(line) + "\n")
        return honest_seal(self, bank, round_idx, delta)

    module.SecAggSealer.seal = seal


class _PatchAfterImport:
    """A meta-path finder: lets the normal finders locate TARGET_MODULE, then patches it once executed."""

    def find_spec(self, name, path=None, target=None):
        if name != TARGET_MODULE:
            return None
        import importlib.machinery

        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        loader = spec.loader
        exec_module = loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            _patch(module)

        loader.exec_module = exec_and_patch
        return spec


if os.environ.get("FEDMOE_HOSTILE_BANK"):
    sys.meta_path.insert(0, _PatchAfterImport())
