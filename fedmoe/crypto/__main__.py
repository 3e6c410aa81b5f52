"""CLI for key ceremonies. Prints ids, public keys and paths, never secret key material.

python -m fedmoe.crypto keygen --out DIR                    CKKS shared-key ceremony (one job)
python -m fedmoe.crypto bfv-keygen --out DIR                BFV key for secure aggregation (one host)
python -m fedmoe.crypto identity --out FILE --bank-id ID    a bank's Ed25519 identity (prints the public key)
python -m fedmoe.crypto pins --out FILE ID=HEX [ID=HEX ...] the consortium pins file from public keys
"""

from __future__ import annotations

import argparse
import logging
import sys

from fedmoe.crypto.errors import CryptoError
from fedmoe.crypto.keys import CkksParams, keygen


def _bits(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(b) for b in text.split(","))
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints like 60,40,60, got {text!r}") from e


def main(argv: list[str] | None = None) -> int:
    defaults = CkksParams()
    parser = argparse.ArgumentParser(prog="python -m fedmoe.crypto", description=__doc__)
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
    bk = sub.add_parser("bfv-keygen", help="create a job's BFV key files for secure aggregation")
    bk.add_argument("--out", required=True, help="directory for context.secret.bfv, context.public.bfv")
    bk.add_argument("--scale-bits", type=int, default=20, help="fixed-point scale 2^bits (default: %(default)s)")
    bk.add_argument("--force", action="store_true", help="replace key files already in --out")
    idp = sub.add_parser("identity", help="create a bank's Ed25519 identity key (mode 0600)")
    idp.add_argument("--out", required=True, help="identity file to write")
    idp.add_argument("--bank-id", required=True, help="the bank's id in the consortium")
    idp.add_argument("--force", action="store_true", help="replace an existing identity file")
    pp = sub.add_parser("pins", help="write the consortium pins file from bank=public-key-hex pairs")
    pp.add_argument("--out", required=True, help="pins file to write (public, 0644)")
    pp.add_argument("pairs", nargs="+", help="BANK_ID=PUBLIC_KEY_HEX, one per bank")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.command != "keygen":
        return _secagg_command(args)

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


def _secagg_command(args: argparse.Namespace) -> int:
    # Imported here: `keygen` must keep working where only the CKKS path is used.
    from fedmoe.crypto.identity import ConsortiumPins, generate_identity, write_pins
    from fedmoe.crypto.secagg.bfv_secret import bfv_keygen
    from fedmoe.crypto.secagg.params import SecAggParams

    try:
        if args.command == "bfv-keygen":
            files = bfv_keygen(args.out, SecAggParams(scale_bits=args.scale_bits), overwrite=args.force)
            print(f"key id:  {files.key_id}")
            print(f"secret:  {files.secret_path}  (mode 0600; every bank, never the server, never git)")
            print(f"public:  {files.public_path}  (the server)")
        elif args.command == "identity":
            ident = generate_identity(args.out, args.bank_id, overwrite=args.force)
            print(f"{ident.bank_id}={ident.public_key.hex()}")
        else:
            keys = {}
            for pair in args.pairs:
                bank, sep, hexkey = pair.partition("=")
                if not sep:
                    raise CryptoError(f"pins: expected BANK_ID=PUBLIC_KEY_HEX, got {pair!r}")
                keys[bank] = bytes.fromhex(hexkey)
            path = write_pins(args.out, ConsortiumPins(keys))
            print(f"pins:    {path}  ({len(keys)} banks)")
    except (CryptoError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
