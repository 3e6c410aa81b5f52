"""Secure aggregation (mask, then BFV-encrypt) vs the shared-key CKKS path, per round, in process.

Prints ONE JSON line. The update is the `small` preset's trainable view under the federated default
(LoRA, only B trained): computed from `model` (219,136 floats; the constant is the fallback when
torch is missing). For each bank count (default 3, 5, 10, 15) it runs one full round through bytes:
  bank_s:   per bank, median over banks: keys (X25519 key pairs, signature), shares (verify
            advertisements, Shamir-deal, AES-GCM-encrypt; decrypt and check received shares),
            masking (quantize + self mask + K-1 pairwise PRG masks), encryption (BFV, public key),
            unmask (check and sign the survivor view, check the consents, release shares),
            decrypt (open the sum: decrypt + dequantize)
  server_s: validate (parse, hash and deserialize masked inputs), adds (ciphertext sums),
            unmasking (Shamir reconstruction, residual masks, one plaintext add, serialization)
  bytes_sent_per_bank: advertisement + share reply + masked input + consent + unmask reply
  bytes_per_float: the masked-input bundle over the update length
  ckks: the shared-key CKKS path on the same updates (fedmoe.crypto.encrypt_update / aggregate / decrypt_mean)
Timings are single runs on a shared box (loadavg is reported); 2 cores here.
Run: .venv/bin/python bench/secagg.py [--banks 3,5,10,15] [--elements N]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

# Run as a script, Python puts bench/ (not the repo root) on sys.path.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import tenseal as ts  # noqa: E402

from fedmoe.crypto import (  # noqa: E402
    ExpectedHeader,
    aggregate,
    decrypt_mean,
    encrypt_update,
    keygen,
    load_public_context,
    load_secret_context,  # noqa: E402
)
from fedmoe.crypto.identity import ConsortiumPins, generate_identity  # noqa: E402
from fedmoe.crypto.secagg.bank import BankSecAgg, open_aggregate  # noqa: E402
from fedmoe.crypto.secagg.bfv import load_bfv_public  # noqa: E402
from fedmoe.crypto.secagg.bfv_secret import bfv_keygen, load_bfv_secret  # noqa: E402
from fedmoe.crypto.secagg.server import ServerSecAgg  # noqa: E402

SMALL_LORA_FLOATS = 219_136  # `small` preset, LoRA rank 8, B only (fallback when torch is missing)


def small_view_size() -> tuple[int, str]:
    try:
        from fedmoe.model.deepseek import PRESETS, DeepseekForCausalLM
        from fedmoe.model.lora import LoraConfig, configure_trainable
        from fedmoe.model.trainable import TrainableView
    except ImportError:
        return SMALL_LORA_FLOATS, "constant"
    model = DeepseekForCausalLM(PRESETS["small"])
    configure_trainable(model, "lora", LoraConfig())
    return sum(p.numel() for p in TrainableView(model).params.values()), "model"


def dp_noise_reference() -> dict:
    """lr * sigma * clip / batch for the job defaults (pyproject): the DP noise std per SGD step."""
    lr, clip, batch, n_train, steps = 0.01, 1.0, 16, 1800, 60  # 3 rounds x 20 steps, 2000 records, 10% eval
    try:
        from opacus.accountants.utils import get_noise_multiplier

        with warnings.catch_warnings():  # opacus warns that the optimal RDP order is at the grid's edge
            warnings.simplefilter("ignore")
            sigma = get_noise_multiplier(
                target_epsilon=8.0, target_delta=1e-5, sample_rate=batch / n_train, steps=steps, accountant="rdp"
            )
    except Exception:  # noqa: BLE001 - opacus missing or failing: report without it
        return {}
    return {"sigma_eps8_rdp": round(sigma, 4), "dp_noise_std_per_sgd_step": float(f"{lr * sigma * clip / batch:.3e}")}


def run_secagg(k: int, n: int, ids, pins, pk, sk, updates, weights) -> dict:
    participants = [i.bank_id for i in ids[:k]]
    setup = ServerSecAgg.make_setup(job_id="bench", round=1, participants=participants, n_elements=n, key=pk)
    server = ServerSecAgg(setup, pins, pk)
    banks = {i.bank_id: BankSecAgg(i, pins) for i in ids[:k]}
    sent = dict.fromkeys(banks, 0)

    def stage(replies: dict) -> dict:
        out = {b: m.to_bytes() for b, m in replies.items()}
        for b, raw in out.items():
            sent[b] += len(raw)
        return out

    reqs = server.receive_advertisements(stage({b: bank.advertise(setup) for b, bank in banks.items()}))
    reqs = server.receive_shares(stage({b: banks[b].share_keys(q) for b, q in reqs.items()}))
    inputs = stage({b: banks[b].masked_input(q, updates[b], weights[b], pk) for b, q in reqs.items()})
    bundle_bytes = len(inputs[participants[0]])
    reqs = server.receive_masked_inputs(inputs)
    orders = server.receive_consents(stage({b: banks[b].consent(q) for b, q in reqs.items()}))
    agg = server.receive_unmask(stage({b: banks[b].unmask(q) for b, q in orders.items()}))
    t = time.perf_counter()
    mean, total = open_aggregate(agg, setup=setup, key=sk, pins=pins)
    decrypt_s = time.perf_counter() - t
    ref = sum(weights[b] * updates[b].astype(np.float64) for b in participants) / sum(weights[b] for b in participants)
    med = {
        key: round(statistics.median(b.timings.get(key, 0.0) for b in banks.values()), 4)
        for key in ("keys", "shares", "masking", "encryption", "unmask")
    }
    return {
        "banks": k,
        "threshold": setup.threshold,
        "bank_s": {**med, "decrypt": round(decrypt_s, 4), "total": round(sum(med.values()) + decrypt_s, 4)},
        "server_s": {key: round(v, 4) for key, v in server.timings.items()},
        "bytes_sent_per_bank": int(statistics.median(sent.values())),
        "masked_input_bytes": bundle_bytes,
        "bytes_per_float": round(bundle_bytes / n, 2),
        "sum_bytes": len(agg.bundle),
        "max_abs_err": float(f"{np.abs(mean - ref).max():.3e}"),
        "total_weight_exact": total == sum(weights[b] for b in participants),
    }


def run_ckks(k: int, n: int, secret, public, updates, weights) -> dict:
    names = list(updates)[:k]
    enc, bundles = [], {}
    for b in names:
        t = time.perf_counter()
        bundles[b] = encrypt_update(updates[b], weight=weights[b], key=public, round=1, layout_hash="bench", bank_id=b)
        enc.append(time.perf_counter() - t)
    expected = ExpectedHeader(key_id=public.key_id, epoch=public.epoch, round=1, layout_hash="bench", n_elements=n)
    t = time.perf_counter()
    result = aggregate(bundles, key=public, expected=expected)
    agg_s = time.perf_counter() - t
    t = time.perf_counter()
    mean, _ = decrypt_mean(result.bundle, secret, expected=expected)
    dec_s = time.perf_counter() - t
    ref = sum(weights[b] * updates[b].astype(np.float64) for b in names) / sum(weights[b] for b in names)
    nbytes = len(bundles[names[0]])
    return {
        "banks": k,
        "bank_encrypt_s": round(statistics.median(enc), 4),
        "bank_decrypt_s": round(dec_s, 4),
        "server_aggregate_s": round(agg_s, 4),
        "bytes_sent_per_bank": nbytes,
        "bytes_per_float": round(nbytes / n, 2),
        "max_abs_err": float(f"{np.abs(mean - ref).max():.3e}"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--banks", default="3,5,10,15", help="comma-separated bank counts (default: %(default)s)")
    parser.add_argument("--elements", type=int, default=0, help="update length (default: the small LoRA view)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    counts = [int(x) for x in args.banks.split(",")]
    started = time.perf_counter()
    load = round(os.getloadavg()[0], 2)
    n, source = (args.elements, "argument") if args.elements else small_view_size()
    rng = np.random.default_rng(args.seed)
    kmax = max(counts)
    names = [f"bank{i:02d}" for i in range(kmax)]
    # DP-noised LoRA-B deltas are small; weights are raw sample counts.
    updates = {b: (rng.standard_normal(n) * 1e-3).astype(np.float32) for b in names}
    weights = {b: float(rng.integers(1_000, 10_000)) for b in names}
    with tempfile.TemporaryDirectory() as tmp:
        ids = [generate_identity(Path(tmp) / f"{b}.id", b) for b in names]
        pins = ConsortiumPins.from_identities(ids)
        t = time.perf_counter()
        bfv = bfv_keygen(Path(tmp) / "bfv")
        bfv_keygen_s = time.perf_counter() - t
        pk, sk = load_bfv_public(bfv.public_path), load_bfv_secret(bfv.secret_path)
        ckks = keygen(Path(tmp) / "ckks")
        c_secret, c_public = load_secret_context(ckks.secret_path), load_public_context(ckks.public_path)
        rows = [run_secagg(k, n, ids, pins, pk, sk, updates, weights) for k in counts]
        ckks_rows = [run_ckks(k, n, c_secret, c_public, updates, weights) for k in counts]
    params = pk.params
    print(
        json.dumps(
            {
                "bench": "secagg",
                "elements": n,
                "elements_from": source,
                "bfv": {
                    "poly_modulus_degree": params.poly_modulus_degree,
                    "coeff_mod_bit_sizes": list(params.coeff_mod_bit_sizes),
                    "plain_modulus": params.plain_modulus,
                    "scale_bits": params.scale_bits,
                    "max_banks": params.max_banks,
                    "quant_step": 2.0**-params.scale_bits,
                    "keygen_s": round(bfv_keygen_s, 4),
                },
                **dp_noise_reference(),
                "secagg": rows,
                "ckks_shared_key": ckks_rows,
                "wall_s": round(time.perf_counter() - started, 1),
                "cpus": os.cpu_count(),
                "loadavg_1m_at_start": load,
                "machine": platform.machine(),
                "tenseal": ts.__version__,
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
