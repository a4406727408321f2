"""Local verification of ServiceAccount tokens against the API server's signing keys.

The API server publishes the public keys it signs ServiceAccount tokens with (its OIDC
discovery: `/.well-known/openid-configuration` names the issuer, `/openid/v1/jwks` holds the
keys). A progress token is checked here first, signature and claims, with `cryptography`; only
a token that passes reaches the TokenReview API. A flood of forged tokens then costs a
signature check each (tens of microseconds), not a call that holds one of the API client's
connections (auth.py).

The keys are read when the operator starts and again when a token names a key id that is not
known (the API server rotated its keys), at most once per `refresh_interval_s`, so tokens with
made-up key ids cannot make the operator hammer the endpoint. When the keys cannot be read at
all (a cluster that removed the default `system:service-account-issuer-discovery` binding) the
operator falls back to the TokenReview for every plausible token and says so in its log.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from kubetune.kube import Kube

logger = logging.getLogger("kubetune.operator.auth")

DISCOVERY_PATH = "/.well-known/openid-configuration"
JWKS_PATH = "/openid/v1/jwks"
JWKS_TYPE = "application/jwk-set+json"  # the only representation the API server offers
# Clock skew tolerated on exp/nbf/iat between the API server and this process.
LEEWAY_S = 30.0
MAX_TOKEN_CHARS = 16 * 1024
HASHES = {"256": hashes.SHA256, "384": hashes.SHA384, "512": hashes.SHA512}
CURVES = {"P-256": ec.SECP256R1, "P-384": ec.SECP384R1, "P-521": ec.SECP521R1}


def _b64(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def _int(part: str) -> int:
    return int.from_bytes(_b64(part), "big")


@dataclass(frozen=True)
class SigningKey:
    kid: str
    alg: str  # RS256, ES256, ...
    public_key: Any  # rsa.RSAPublicKey | ec.EllipticCurvePublicKey

    def verifies(self, signing_input: bytes, signature: bytes) -> bool:
        digest = HASHES[self.alg[2:]]()
        try:
            if self.alg.startswith("RS"):
                self.public_key.verify(signature, signing_input, padding.PKCS1v15(), digest)
            else:  # ES*: the JWS signature is r || s, each half the length
                half = len(signature) // 2
                der = encode_dss_signature(
                    int.from_bytes(signature[:half], "big"), int.from_bytes(signature[half:], "big")
                )
                self.public_key.verify(der, signing_input, ec.ECDSA(digest))
        except (InvalidSignature, ValueError):
            return False
        return True


def key_from_jwk(jwk: dict) -> SigningKey | None:
    """A signing key from one JWK of the API server's set; None for a kind not used to sign
    ServiceAccount tokens (the API server signs with RSA or ECDSA keys)."""
    try:
        kid, kty = str(jwk.get("kid") or ""), jwk.get("kty")
        if kty == "RSA":
            alg = jwk.get("alg") or "RS256"
            public = rsa.RSAPublicNumbers(_int(jwk["e"]), _int(jwk["n"])).public_key()
        elif kty == "EC" and jwk.get("crv") in CURVES:
            alg = (
                jwk.get("alg") or {"P-256": "ES256", "P-384": "ES384", "P-521": "ES512"}[jwk["crv"]]
            )
            curve = CURVES[jwk["crv"]]()
            public = ec.EllipticCurvePublicNumbers(_int(jwk["x"]), _int(jwk["y"]), curve)
            public = public.public_key()
        else:
            return None
    except (KeyError, ValueError, binascii.Error):
        return None
    if alg[:2] not in ("RS", "ES") or alg[2:] not in HASHES:
        return None
    return SigningKey(kid, alg, public)


def verify(
    token: str,
    keys: dict[str, SigningKey],
    *,
    audience: str,
    issuer: str | None,
    now: float,
) -> tuple[dict | None, str]:
    """(claims, "") of a token whose signature one of `keys` verifies and whose claims are
    live for `audience` (and `issuer`, when known); else (None, why). Why is "unknown key"
    when the token names a key id not in `keys` (they may have been rotated)."""
    if len(token) > MAX_TOKEN_CHARS:
        return None, "too long"
    parts = token.split(".")
    if len(parts) != 3:
        return None, "not a JWT"
    try:
        header = json.loads(_b64(parts[0]))
        claims = json.loads(_b64(parts[1]))
        signature = _b64(parts[2])
    except (ValueError, binascii.Error):
        return None, "not a JWT"
    if not isinstance(header, dict) or not isinstance(claims, dict):
        return None, "not a JWT"
    kid = header.get("kid")
    key = keys.get(kid) if isinstance(kid, str) else None
    if key is None:
        return None, "unknown key"
    if header.get("alg") != key.alg:  # never the token's choice (alg=none, HS256 with the key)
        return None, "wrong algorithm"
    if not key.verifies(f"{parts[0]}.{parts[1]}".encode(), signature):
        return None, "bad signature"
    audiences = claims.get("aud")
    audiences = [audiences] if isinstance(audiences, str) else audiences or []
    if audience not in audiences:
        return None, "wrong audience"
    expires, not_before = claims.get("exp"), claims.get("nbf")
    if not isinstance(expires, int | float) or expires <= now - LEEWAY_S:
        return None, "expired"
    if isinstance(not_before, int | float) and not_before > now + LEEWAY_S:
        return None, "not yet valid"
    if issuer and claims.get("iss") != issuer:
        return None, "wrong issuer"
    return claims, ""


@dataclass
class ServiceAccountKeys:
    """The API server's current signing keys and issuer, read through `kube`."""

    kube: Kube
    refresh_interval_s: float = 30.0
    keys: dict[str, SigningKey] = field(default_factory=dict)
    issuer: str | None = None
    available: bool = False  # the keys could be read (else: TokenReview only)
    _fetched_at: float = -1e18

    async def refresh(self, force: bool = False) -> bool:
        """Read the keys again, unless they were read less than refresh_interval_s ago;
        True when they were read now."""
        now = time.monotonic()
        if not force and now - self._fetched_at < self.refresh_interval_s:
            return False
        self._fetched_at = now
        try:
            discovery = (await self.kube.request("GET", DISCOVERY_PATH)).body or {}
            jwks = (await self.kube.request("GET", JWKS_PATH, accept=JWKS_TYPE)).body or {}
        except Exception as exc:
            if self.available or not self.keys:
                logger.warning(
                    "cannot read the API server's ServiceAccount signing keys (%s); progress "
                    "tokens are checked by TokenReview only",
                    exc,
                )
            self.available = bool(self.keys)
            return False
        keys = [key_from_jwk(jwk) for jwk in jwks.get("keys") or [] if isinstance(jwk, dict)]
        self.keys = {key.kid: key for key in keys if key is not None}
        self.issuer = discovery.get("issuer") or None
        self.available = bool(self.keys)
        return True
