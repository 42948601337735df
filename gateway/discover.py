"""`edge-gateway discover {opcua,modbus}`: what a device offers, as a config skeleton.

The protocol work lives in `drivers.discover_opcua` and `drivers.discover_modbus`, what both
share in `drivers.discovery`; this module is the command line. The YAML goes to stdout, every
remark as a comment, so that the output can be pasted (or redirected) into a configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from drivers.discovery import DiscoverError, Progress


def add_parser(sub: argparse._SubParsersAction) -> None:
    """The `discover` subcommand and its two kinds (wired into gateway.cli)."""
    p = sub.add_parser("discover", help="ask a device what it offers and print a config skeleton (read-only)")
    kinds = p.add_subparsers(dest="kind", required=True)

    def common(q: argparse.ArgumentParser, time_limit: float) -> None:
        q.add_argument("--time-limit", type=float, default=time_limit,
                       help=f"stop after this many seconds (default {time_limit:.0f})")
        q.add_argument("--progress", action="store_true", help="progress lines on stderr even when it is not a terminal")
        q.add_argument("--name", help="device name in the skeleton (default: from the address)")

    q = kinds.add_parser("opcua", help="endpoints, security policies and variables of an OPC UA server")
    q.add_argument("endpoint", help="opc.tcp://HOST:PORT[/PATH]")
    q.add_argument("--root", default="i=85", help="node id to browse from (default: the Objects folder, i=85)")
    q.add_argument("--depth", type=int, default=10, help="levels below the root to browse (default 10)")
    q.add_argument("--max-nodes", type=int, default=5000, help="nodes to visit at most (default 5000)")
    q.add_argument("--timeout", type=float, default=5.0, help="seconds per request (default 5)")
    q.add_argument("--policy", default="None",
                   choices=["None", "Basic256Sha256", "Aes128_Sha256_RsaOaep", "Aes256_Sha256_RsaPss"])
    q.add_argument("--mode", default="None", choices=["None", "Sign", "SignAndEncrypt"])
    q.add_argument("--certificate", help="client application certificate (PEM or DER)")
    q.add_argument("--private-key", help="private key of the client certificate")
    q.add_argument("--private-key-password-file")
    q.add_argument("--server-certificate", help="pin the server certificate")
    q.add_argument("--application-uri")
    q.add_argument("--username")
    q.add_argument("--password-file", help="file holding the password (trailing newline ignored)")
    common(q, 120.0)

    q = kinds.add_parser("modbus", help="unit ids and readable register ranges of a Modbus device or line")
    q.add_argument("host", nargs="?", help="HOST[:PORT] for Modbus TCP (default port 502)")
    q.add_argument("--serial", metavar="PORT", help="Modbus RTU on this serial port instead of TCP")
    q.add_argument("--baudrate", type=int, default=19200)
    q.add_argument("--parity", choices=["N", "E", "O"], default="N")
    q.add_argument("--stopbits", type=int, choices=[1, 2], default=1)
    q.add_argument("--bytesize", type=int, choices=[7, 8], default=8)
    q.add_argument("--units", help="unit ids to try, e.g. 1-10,17 (default: 1-247 on serial, 1 on TCP)")
    q.add_argument("--addresses", default="0-9999",
                   help="register and bit addresses to probe in each table (default 0-9999; 0-65535 for all)")
    q.add_argument("--tables", default="coil,discrete,holding,input", help="tables to probe (default: all four)")
    q.add_argument("--timeout", type=float, default=0.3, help="seconds to wait for each answer (default 0.3)")
    q.add_argument("--max-requests", type=int, default=10000, help="requests to send at most (default 10000)")
    common(q, 600.0)  # 247 silent unit ids on a serial line alone take 74 s at the default timeout
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    """Run one discovery; the YAML on stdout, exit 0; or one line on stderr, exit 1."""
    progress = Progress(always=args.progress)
    logging.getLogger("asyncua").setLevel(logging.CRITICAL)  # its warnings would garble the progress line
    logging.getLogger("pymodbus").setLevel(logging.CRITICAL)  # each timeout is an expected answer here
    try:
        if args.kind == "opcua":
            from drivers.discover_opcua import discover
        else:
            from drivers.discover_modbus import discover
        text = asyncio.run(discover(args, progress))
    except DiscoverError as exc:
        progress.done()
        print(f"edge-gateway: discover {args.kind}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        progress.done()
        print(f"edge-gateway: discover {args.kind}: interrupted", file=sys.stderr)
        return 1
    progress.done()
    sys.stdout.write(text)
    return 0
