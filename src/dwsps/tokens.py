"""Tokens on the command line: what ``pub``, ``sub`` and ``bench`` present, and ``dwsps token``.

Client commands take the token they present from, in this order, ``--token``,
``--token-file`` or ``$DWSPS_TOKEN``. A token given as an argument is visible
to every local user in the process list, so the file and the environment
variable are the ones to use outside of experiments.

``dwsps token`` signs a token for testing (:func:`dwsps.auth.mint_token`)
with the server's shared secret (``--secret``, ``--secret-file`` or
``$DWSPS_AUTH_JWT_SECRET``, the server's own variable) or a PEM private key
(``--key``), and prints it on stdout.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from typing import Final

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from dwsps.auth import EC_ALGORITHMS, EDDSA, HMAC_ALGORITHMS, SUPPORTED_ALGORITHMS, mint_token
from dwsps.config import parse_duration
from dwsps.errors import ConfigError, PermissionsError, TokenSourceError
from dwsps.permissions import Permissions, parse_permissions

TOKEN_ENV: Final = "DWSPS_TOKEN"
SECRET_ENV: Final = "DWSPS_AUTH_JWT_SECRET"
DEFAULT_TTL: Final = "1h"


# -- the token a client command presents ------------------------------------------


def add_token_options(parser: argparse.ArgumentParser) -> None:
    """Declare ``--token`` and ``--token-file`` on a client command."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--token",
        metavar="TOKEN",
        help=f"present TOKEN as Authorization: Bearer (visible in ps: prefer --token-file"
        f" or ${TOKEN_ENV})",
    )
    group.add_argument(
        "--token-file",
        metavar="FILE",
        help=f"read the token from FILE, again whenever it needs renewing (default:"
        f" ${TOKEN_ENV}, if set)",
    )


def token_from_args(args: argparse.Namespace) -> str | None:
    """The token to present: ``--token``, else ``--token-file``, else ``$DWSPS_TOKEN``, else None.

    Raises :class:`TokenSourceError` for an unreadable or empty file.
    """
    if args.token:
        return str(args.token).strip()
    if args.token_file:
        token = _read(args.token_file, "--token-file").strip()
        if not token:
            raise TokenSourceError(f"--token-file: {args.token_file} is empty")
        return token
    return os.environ.get(TOKEN_ENV, "").strip() or None


def token_file_provider(args: argparse.Namespace) -> Callable[[], str] | None:
    """With ``--token-file``, a provider that reads it again (a rotated token is picked up)."""
    path = args.token_file
    if not path:
        return None

    def provide() -> str:
        token = _read(path, "--token-file").strip()
        if not token:
            raise TokenSourceError(f"--token-file: {path} is empty")
        return token

    return provide


def _read(path: str, option: str) -> str:
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read()
    except (OSError, UnicodeDecodeError) as exc:
        detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise TokenSourceError(f"{option}: cannot read {path}: {detail}") from None


# -- dwsps token -------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare the ``dwsps token`` options on ``parser``."""
    parser.description = (
        "Sign a JWT for testing a dwsps server and print it. The key is the server's shared"
        f" secret (--secret, --secret-file or ${SECRET_ENV}) or a PEM private key (--key)"
        " whose public half the server has (--auth-jwt-public-key)."
    )
    key = parser.add_mutually_exclusive_group()
    key.add_argument(
        "--secret",
        metavar="SECRET",
        help=f"HS256/384/512 secret (visible in ps: prefer --secret-file or ${SECRET_ENV})",
    )
    key.add_argument("--secret-file", metavar="FILE", help="read the secret from FILE")
    key.add_argument(
        "--key", metavar="PEM", help="PEM private key file (RSA, EC P-256/P-384, Ed25519/Ed448)"
    )
    parser.add_argument(
        "--alg",
        choices=SUPPORTED_ALGORITHMS,
        metavar="ALG",
        help="signing algorithm (default: HS256 with a secret, else the key's own:"
        " RS256, ES256, ES384 or EdDSA)",
    )
    parser.add_argument("--sub", metavar="USER", help="the sub claim: who the client is")
    expiry = parser.add_mutually_exclusive_group()
    expiry.add_argument(
        "--ttl",
        metavar="DURATION",
        type=_duration,
        help=f"lifetime: exp = now + DURATION (e.g. 90s, 10m, 1h; default {DEFAULT_TTL})",
    )
    expiry.add_argument("--exp", metavar="EPOCH", type=float, help="the exp claim as epoch seconds")
    expiry.add_argument(
        "--no-exp", action="store_true", help="no exp claim: the token never expires"
    )
    parser.add_argument("--aud", metavar="AUDIENCE", help="the aud claim")
    parser.add_argument("--iss", metavar="ISSUER", help="the iss claim")
    parser.add_argument(
        "--subscribe",
        metavar="PATTERN",
        action="append",
        help="may subscribe within PATTERN (repeatable); with --subscribe or --publish the"
        " token carries a dwsps claim, and what is not listed is not permitted; without"
        " either, the server's default permissions apply",
    )
    parser.add_argument(
        "--publish", metavar="PATTERN", action="append", help="may publish within PATTERN"
    )


def _duration(text: str) -> float:
    try:
        seconds = parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if seconds <= 0:
        raise argparse.ArgumentTypeError("must be more than 0 seconds")
    return seconds


def run(args: argparse.Namespace) -> int:
    """Run ``dwsps token``: print the token, or say why not (exit 1)."""
    try:
        print(_mint(args), flush=True)
    except (ConfigError, TokenSourceError, ValueError) as exc:
        print(f"dwsps token: {exc}", file=sys.stderr, flush=True)
        return 1
    return 0


def _mint(args: argparse.Namespace) -> str:
    permissions: Permissions | None = None
    if args.subscribe is not None or args.publish is not None:
        try:
            permissions = parse_permissions(
                {"subscribe": args.subscribe or [], "publish": args.publish or []}
            )
        except PermissionsError as exc:
            raise TokenSourceError(str(exc)) from None
    key, default_alg = _signing_key(args)
    algorithm = args.alg or default_alg
    if isinstance(key, str) != (algorithm in HMAC_ALGORITHMS):
        kind = "a secret" if isinstance(key, str) else "a private key"
        raise TokenSourceError(f"--alg {algorithm} does not go with {kind}")
    ttl: float | None = None
    if args.exp is None and not args.no_exp:
        ttl = args.ttl if args.ttl is not None else parse_duration(DEFAULT_TTL)
    return mint_token(
        key,
        sub=args.sub,
        ttl=ttl,
        expires_at=args.exp,
        permissions=permissions,
        algorithm=algorithm,
        audience=args.aud,
        issuer=args.iss,
        now=time.time(),
    )


def _signing_key(args: argparse.Namespace) -> tuple[str | bytes, str]:
    """The key (a secret str, or PEM bytes) and its default algorithm."""
    if args.key:
        try:
            with open(args.key, "rb") as fh:
                pem = fh.read()
        except OSError as exc:
            raise TokenSourceError(f"--key: cannot read {args.key}: {exc.strerror}") from None
        return pem, _key_algorithm(pem)
    if args.secret_file:
        secret = _read(args.secret_file, "--secret-file").rstrip("\r\n")
    else:
        secret = args.secret or os.environ.get(SECRET_ENV, "")
    if not secret:
        raise TokenSourceError(f"give --secret, --secret-file, --key or ${SECRET_ENV}")
    return secret, "HS256"


def _key_algorithm(pem: bytes) -> str:
    try:
        key = load_pem_private_key(pem, password=None)
    except TypeError:
        raise TokenSourceError(
            "--key: the key is encrypted; decrypt it first (openssl pkey -in KEY -out PLAIN)"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise TokenSourceError("--key: not a PEM private key") from None
    if isinstance(key, rsa.RSAPrivateKey):
        return "RS256"
    if isinstance(key, ec.EllipticCurvePrivateKey):
        alg = EC_ALGORITHMS.get(key.curve.name)
        if alg is None:
            raise TokenSourceError(f"--key: EC keys on {key.curve.name} are not accepted")
        return alg
    if isinstance(key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey):
        return EDDSA
    raise TokenSourceError("--key: an RSA, EC or Ed25519/Ed448 private key is needed")
