"""Who pushes progress: the trainer pod behind a projected ServiceAccount token.

Each trainer pod gets a token bound to it, for the operator's audience only (the API server
refuses it). The operator asks the API server's TokenReview whether a presented token is
genuine and which pod it is bound to, and remembers the answer until the token expires, so a
trainer pushing ten times a second costs one review per token lifetime.
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

TOKEN_REVIEW_PATH = "/apis/authentication.k8s.io/v1/tokenreviews"
EXTRA_POD_NAME = "authentication.kubernetes.io/pod-name"
EXTRA_POD_UID = "authentication.kubernetes.io/pod-uid"
SERVICE_ACCOUNT_PREFIX = "system:serviceaccount:"
# Answers kept at most (a trainer pod holds one token at a time, two around a renewal).
MAX_CACHED = 10_000


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
    """Genuine-token check through the TokenReview API, cached until each token expires."""

    def __init__(
        self, kube: Kube, audience: str, on_review: Callable[[], None] = lambda: None
    ) -> None:
        self.kube = kube
        self.audience = audience
        self.on_review = on_review  # called for each TokenReview sent (the cache's misses)
        self._cache: dict[str, PodIdentity] = {}

    async def identify(self, token: str) -> PodIdentity | None:
        now = time.time()
        digest = hashlib.sha256(token.encode()).hexdigest()
        cached = self._cache.get(digest)
        if cached is not None and cached.expires_at > now:
            return cached
        claims = plausible(token, self.audience, now)
        if claims is None:
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
        return identity

    def _remember(self, digest: str, identity: PodIdentity, now: float) -> None:
        if len(self._cache) >= MAX_CACHED:
            self._cache = {k: v for k, v in self._cache.items() if v.expires_at > now}
            if len(self._cache) >= MAX_CACHED:
                self._cache.clear()
        self._cache[digest] = identity
