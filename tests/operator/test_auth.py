"""Progress-token checks that need no API server: what a token must claim before it is
reviewed, and what a TokenReview answer must say to name a trainer pod."""

from __future__ import annotations

import base64
import json

from kubetune_operator.auth import PodIdentity, identity_from_review, plausible

AUDIENCE = "kubetune.io/progress"
NOW = 1_800_000_000.0


def jwt(claims: dict) -> str:
    def part(data: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")

    return f"{part({'alg': 'RS256'})}.{part(claims)}.signature"


def review(**status: object) -> dict:
    user = {
        "username": "system:serviceaccount:team-a:default",
        "extra": {
            "authentication.kubernetes.io/pod-name": ["tune-trainer-abcde"],
            "authentication.kubernetes.io/pod-uid": ["pod-uid-1"],
        },
    }
    return {"status": {"authenticated": True, "audiences": [AUDIENCE], "user": user, **status}}


def test_only_tokens_claiming_our_audience_and_not_expired_are_reviewed() -> None:
    good = {"aud": [AUDIENCE], "exp": NOW + 600}
    assert plausible(jwt(good), AUDIENCE, NOW) == good
    assert plausible(jwt({**good, "aud": AUDIENCE}), AUDIENCE, NOW)  # aud may be one string
    for claims in ({**good, "aud": ["https://kubernetes.default.svc"]}, {**good, "exp": NOW - 1}):
        assert plausible(jwt(claims), AUDIENCE, NOW) is None
    for garbage in ("", "not-a-token", "a.b.c", "a.!!!.c"):
        assert plausible(garbage, AUDIENCE, NOW) is None


def test_a_review_names_the_pod_the_token_is_bound_to() -> None:
    assert identity_from_review(review(), AUDIENCE, NOW) == PodIdentity(
        "team-a", "tune-trainer-abcde", "pod-uid-1", NOW
    )


def test_unauthenticated_wrong_audience_or_unbound_tokens_name_nobody() -> None:
    assert identity_from_review(review(authenticated=False), AUDIENCE, NOW) is None
    assert identity_from_review(review(audiences=["other"]), AUDIENCE, NOW) is None
    unbound = review()
    unbound["status"]["user"]["extra"] = {}
    assert identity_from_review(unbound, AUDIENCE, NOW) is None  # not bound to a pod
    person = review()
    person["status"]["user"]["username"] = "alice"
    assert identity_from_review(person, AUDIENCE, NOW) is None
