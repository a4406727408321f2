"""Who pushes progress: the trainer pod behind a projected ServiceAccount token.

Each trainer pod gets a token bound to it, for the operator's audience only (the API server
refuses it). The operator first verifies the token's signature and claims locally against the
API server's signing keys (signing_keys.py): a forged, expired or foreign token is refused
without any call. A token that passes goes to the API server's TokenReview, which says whether
it is still genuine (its pod exists) and which pod it is bound to; the answer is remembered
until the token expires, so a trainer pushing ten times a second costs one review per token
lifetime. Refused tokens are remembered too (NEGATIVE_TTL_S), so one replayed in a loop costs
a dictionary lookup.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass

from kubetune.kube import Kube
from kubetune_operator.signing_keys import ServiceAccountKeys, verify

TOKEN_REVIEW_PATH = "/apis/authentication.k8s.io/v1/tokenreviews"
EXTRA_POD_NAME = "authentication.kubernetes.io/pod-name"
EXTRA_POD_UID = "authentication.kubernetes.io/pod-uid"
SERVICE_ACCOUNT_PREFIX = "system:serviceaccount:"
# Answers kept at most (a trainer pod holds one token at a time, two around a renewal).
MAX_CACHED = 10_000
# How long a refused token stays refused without another look (never past its expiry).
NEGATIVE_TTL_S = 60.0


@dataclass(frozen=True)
class PodIdentity:
    """The pod a genuine token is bound to."""

    namespace: str
    pod_name: str
    pod_uid: str
    expires_at: float  # time.time()


def _claims(token: str) -> dict | None:
    """The JWT's payload, unverified: only to skip tokens that cannot be ours before asking
    the API server, and to know when a reviewed one expires."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        payload = base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4))
        claims = json.loads(payload)
    except (binascii.Error, ValueError):
        return None
    return claims if isinstance(claims, dict) else None


def plausible(token: str, audience: str, now: float) -> dict | None:
    """The claims of a token that could be a live token for `audience`, else None."""
    claims = _claims(token)
    if claims is None:
        return None
    audiences = claims.get("aud")
    audiences = [audiences] if isinstance(audiences, str) else audiences or []
    expires = claims.get("exp")
    if audience not in audiences or not isinstance(expires, int | float) or expires <= now:
        return None
    return claims


def identity_from_review(review: dict, audience: str, expires_at: float) -> PodIdentity | None:
    """The pod of an authenticated TokenReview for our audience, else None."""
    status = review.get("status") or {}
    if not status.get("authenticated") or audience not in (status.get("audiences") or []):
        return None
    user = status.get("user") or {}
    username = user.get("username") or ""
    if not username.startswith(SERVICE_ACCOUNT_PREFIX):
        return None
    namespace = username.removeprefix(SERVICE_ACCOUNT_PREFIX).split(":", 1)[0]
    extra = user.get("extra") or {}
    pod_name = (extra.get(EXTRA_POD_NAME) or [None])[0]
    pod_uid = (extra.get(EXTRA_POD_UID) or [None])[0]
    if not (namespace and pod_name and pod_uid):
        return None  # a token not bound to a pod identifies no trainer
    return PodIdentity(namespace, pod_name, pod_uid, expires_at)


class TokenReviewer:
    """Genuine-token check: locally against the signing keys, then through the TokenReview
    API; both answers cached (a yes until the token expires, a no for NEGATIVE_TTL_S)."""

    def __init__(
        self,
        kube: Kube,
        audience: str,
        on_review: Callable[[], None] = lambda: None,
        keys: ServiceAccountKeys | None = None,
        on_refused: Callable[[str], None] = lambda why: None,
    ) -> None:
        self.kube = kube
        self.audience = audience
        self.on_review = on_review  # called for each TokenReview sent (the cache's misses)
        self.on_refused = on_refused  # called with the reason for each token refused locally
        self.keys = keys
        self._cache: dict[str, PodIdentity] = {}
        self._refused: dict[str, float] = {}  # digest -> refused until (time.time())

    async def identify(self, token: str) -> PodIdentity | None:
        now = time.time()
        digest = hashlib.sha256(token.encode()).hexdigest()
        cached = self._cache.get(digest)
        if cached is not None and cached.expires_at > now:
            return cached
        if self._refused.get(digest, 0.0) > now:
            self.on_refused("refused before")
            return None
        claims = await self._verified_claims(token, now)
        if claims is None:
            self._refuse(digest, now)
            return None
        self.on_review()
        review = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "spec": {"token": token, "audiences": [self.audience]},
        }
        response = await self.kube.request("POST", TOKEN_REVIEW_PATH, review)
        identity = identity_from_review(response.body or {}, self.audience, float(claims["exp"]))
        if identity is not None:
            self._remember(digest, identity, now)
        else:
            self._refuse(digest, now)
        return identity

    async def _verified_claims(self, token: str, now: float) -> dict | None:
        """The claims of a token worth a TokenReview: verified against the signing keys, or,
        when those cannot be read, merely plausible."""
        keys = self.keys
        if keys is None or not keys.available:
            claims = plausible(token, self.audience, now)
            if claims is None:
                self.on_refused("implausible")
            return claims
        claims, why = verify(token, keys.keys, audience=self.audience, issuer=keys.issuer, now=now)
        if why == "unknown key" and await keys.refresh():  # rotated keys (rate-limited)
            claims, why = verify(
                token, keys.keys, audience=self.audience, issuer=keys.issuer, now=now
            )
        if claims is None:
            self.on_refused(why)
        return claims

    def _refuse(self, digest: str, now: float) -> None:
        if len(self._refused) >= MAX_CACHED:
            self._refused = {k: v for k, v in self._refused.items() if v > now}
            if len(self._refused) >= MAX_CACHED:
                self._refused.clear()
        self._refused[digest] = now + NEGATIVE_TTL_S

    def _remember(self, digest: str, identity: PodIdentity, now: float) -> None:
        if len(self._cache) >= MAX_CACHED:
            self._cache = {k: v for k, v in self._cache.items() if v.expires_at > now}
            if len(self._cache) >= MAX_CACHED:
                self._cache.clear()
        self._cache[digest] = identity
