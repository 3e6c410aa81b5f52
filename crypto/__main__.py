"""CLI: `python -m crypto keygen --out DIR` runs the key ceremony for one federation job.

Prints the key id and file paths, never key material.
"""

from __future__ import annotations

import argparse
import logging
import sys

from crypto.errors import CryptoError
from crypto.keys import CkksParams, keygen


def _bits(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(b) for b in text.split(","))
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints like 60,40,60, got {text!r}") from e


def main(argv: list[str] | None = None) -> int:
    defaults = CkksParams()
    parser = argparse.ArgumentParser(prog="python -m crypto", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    kg = sub.add_parser("keygen", help="create a job's CKKS key files (secret for banks, public for the server)")
    kg.add_argument("--out", required=True, help="directory for context.secret.ckks, context.public.ckks, key.json")
    kg.add_argument("--epoch", type=int, default=1, help="key epoch, >= 1; bump on rotation (default: 1)")
    kg.add_argument(
        "--poly", type=int, default=defaults.poly_modulus_degree, help="poly_modulus_degree N (default: %(default)s)"
    )
    kg.add_argument(
        "--coeff-mod-bits",
        type=_bits,
        default=defaults.coeff_mod_bit_sizes,
        help="coefficient modulus bit sizes (default: 60,40,60)",
    )
    kg.add_argument(
        "--scale-bits",
        type=int,
        default=defaults.scale_bits,
        help="log2 of the CKKS scale, >= 30 (default: %(default)s)",
    )
    kg.add_argument("--force", action="store_true", help="replace key files already in --out")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    try:
        params = CkksParams(
            poly_modulus_degree=args.poly, coeff_mod_bit_sizes=args.coeff_mod_bits, scale_bits=args.scale_bits
        )
        files = keygen(args.out, params, epoch=args.epoch, overwrite=args.force)
    except CryptoError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    info = files.info
    print(f"key id:  {info.key_id}")
    print(f"epoch:   {info.epoch}")
    bits = ",".join(map(str, params.coeff_mod_bit_sizes))
    print(f"params:  N={params.poly_modulus_degree} coeff_mod_bits={bits} scale=2^{params.scale_bits}")
    print(f"secret:  {files.secret_path}  (mode 0600; mount on every bank, never on the server, never in git)")
    print(f"public:  {files.public_path}  (mount on the server)")
    print(f"info:    {files.info_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
