"""Mutual authentication by the cluster secret: challenge and response, so the secret never travels.

Both ends prove they know the secret by an HMAC-SHA256 over both sides' fresh nonces, in Pyro5's one
handshake round trip plus one call:

1. the client's handshake data is `challenge(Nc)`;
2. the daemon answers `answer(secret, Nc, Ns)`: its own nonce and `proof(secret, "daemon", Nc, Ns)`, and
   expects `proof(secret, "client", Nc, Ns)` next;
3. the client checks the daemon's proof (`check_answer`; a daemon that cannot give it is a stranger:
   a fake worker gets no work and learns nothing) and calls `authenticate(proof(secret, "client", ...))`
   on the daemon's own object, before which the daemon serves nothing else on that connection.

The roles in the MAC keep one side's proof from being reflected as the other's; the nonces keep a
recorded exchange from being replayed. No clocks are involved.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from typing import Any

from rmidl.errors import AuthenticationError

__all__ = [
    "AUTHENTICATE",
    "SCHEME",
    "answer",
    "challenge",
    "check_answer",
    "check_challenge",
    "new_nonce",
    "proof",
]

SCHEME = "rmidl-hmac-sha256-v1"
"""Names the exchange in both handshake records (a daemon or client of another scheme is refused)."""
AUTHENTICATE = "authenticate"
"""The method of the daemon's own object ("Pyro.Daemon") that takes the client's proof."""
_NONCE = re.compile(r"^[0-9a-f]{32,128}$")


def new_nonce() -> str:
    """128 random bits as hex."""
    return secrets.token_hex(16)


def proof(secret: str, role: str, client_nonce: str, daemon_nonce: str) -> str:
    """What `role` ("client" or "daemon") sends to show it knows `secret`, bound to this exchange."""
    message = "\0".join((SCHEME, role, client_nonce, daemon_nonce)).encode("ascii")
    return hmac.new(secret.encode("utf-8"), message, hashlib.sha256).hexdigest()


def challenge(client_nonce: str) -> dict[str, str]:
    """The client's handshake data."""
    return {"auth": SCHEME, "nonce": client_nonce}


def check_challenge(data: Any) -> str:
    """The client nonce of handshake data; AuthenticationError for anything else (e.g. a bare secret)."""
    if not (isinstance(data, dict) and data.get("auth") == SCHEME and isinstance(data.get("nonce"), str)
            and _NONCE.match(data["nonce"])):
        raise AuthenticationError("no challenge of the cluster's scheme in the handshake")
    return str(data["nonce"])


def answer(secret: str, client_nonce: str, daemon_nonce: str) -> dict[str, str]:
    """The daemon's handshake response: its nonce and its proof."""
    return {"auth": SCHEME, "nonce": daemon_nonce,
            "proof": proof(secret, "daemon", client_nonce, daemon_nonce)}


def check_answer(secret: str, client_nonce: str, response: Any, where: str) -> str:
    """The daemon nonce of a response whose proof holds; AuthenticationError naming `where` otherwise."""
    if not (isinstance(response, dict) and response.get("auth") == SCHEME
            and isinstance(response.get("nonce"), str) and _NONCE.match(response["nonce"])
            and isinstance(response.get("proof"), str)):
        raise AuthenticationError(f"{where} did not prove it knows the cluster secret (it has none, or is "
                                  "not a member of this cluster)")
    expected = proof(secret, "daemon", client_nonce, response["nonce"])
    if not hmac.compare_digest(expected, response["proof"]):
        raise AuthenticationError(f"{where} does not know our cluster secret: cluster secret missing or "
                                  "wrong on one side")
    return str(response["nonce"])
