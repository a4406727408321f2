"""Progress tokens verified locally before any TokenReview: the pure verification (signature,
algorithm, audience, expiry, issuer) with keys made here, and on a real API server its own
signing keys: forged tokens refused without a review, a genuine pod-bound token accepted."""

from __future__ import annotations

import asyncio
import base64
import json
import time

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from kubetune.kube import Kube, core_path
from kubetune_devcluster.controlplane import DevCluster
from kubetune_operator.auth import TokenReviewer
from kubetune_operator.signing_keys import ServiceAccountKeys, key_from_jwk, verify

AUDIENCE = "kubetune.io/progress"
ISSUER = "https://kubernetes.default.svc"
NOW = 1_800_000_000.0


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def b64int(value: int) -> str:
    return b64(value.to_bytes((value.bit_length() + 7) // 8, "big"))


RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())


def rsa_jwk(kid: str = "rsa-1") -> dict:
    numbers = RSA_KEY.public_key().public_numbers()
    return {
        "kty": "RSA",
        "kid": kid,
        "alg": "RS256",
        "n": b64int(numbers.n),
        "e": b64int(numbers.e),
    }


def ec_jwk(kid: str = "ec-1") -> dict:
    numbers = EC_KEY.public_key().public_numbers()
    x, y = (v.to_bytes(32, "big") for v in (numbers.x, numbers.y))
    return {"kty": "EC", "kid": kid, "crv": "P-256", "x": b64(x), "y": b64(y)}


def sign(claims: dict, *, kid: str = "rsa-1", alg: str = "RS256", key: object = RSA_KEY) -> str:
    header = b64(json.dumps({"alg": alg, "kid": kid}).encode())
    payload = b64(json.dumps(claims).encode())
    data = f"{header}.{payload}".encode()
    if alg == "RS256":
        signature = key.sign(data, padding.PKCS1v15(), hashes.SHA256())  # type: ignore[attr-defined]
    else:
        r, s = decode_dss_signature(key.sign(data, ec.ECDSA(hashes.SHA256())))  # type: ignore[attr-defined]
        signature = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    return f"{header}.{payload}.{b64(signature)}"


CLAIMS = {"aud": [AUDIENCE], "exp": NOW + 600, "nbf": NOW - 5, "iss": ISSUER}
KEYS = {k.kid: k for k in (key_from_jwk(rsa_jwk()), key_from_jwk(ec_jwk())) if k}


def check(token: str) -> str:
    claims, why = verify(token, KEYS, audience=AUDIENCE, issuer=ISSUER, now=NOW)
    assert (claims is None) == bool(why)
    return why or "ok"


def test_a_token_signed_by_a_published_key_with_live_claims_passes() -> None:
    assert check(sign(CLAIMS)) == "ok"
    assert check(sign(CLAIMS, kid="ec-1", alg="ES256", key=EC_KEY)) == "ok"
    assert check(sign({**CLAIMS, "aud": AUDIENCE})) == "ok"  # aud may be one string


def test_forged_foreign_or_dead_tokens_are_refused_naming_why() -> None:
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    good = sign(CLAIMS)
    header, payload, signature = good.split(".")
    tampered = b64(json.dumps({**CLAIMS, "aud": [AUDIENCE, "x"], "sub": "admin"}).encode())
    cases = {
        "bad signature": sign(CLAIMS, key=other),  # a key of one's own, the real key id
        "wrong audience": sign({**CLAIMS, "aud": ["https://kubernetes.default.svc"]}),
        "expired": sign({**CLAIMS, "exp": NOW - 60}),
        "not yet valid": sign({**CLAIMS, "nbf": NOW + 600}),
        "wrong issuer": sign({**CLAIMS, "iss": "https://evil.example"}),
        "unknown key": sign(CLAIMS, kid="made-up"),
        "wrong algorithm": f"{b64(json.dumps({'alg': 'none', 'kid': 'rsa-1'}).encode())}."
        f"{payload}.",
    }
    for why, token in cases.items():
        assert check(token) == why, why
    assert check(f"{header}.{tampered}.{signature}") == "bad signature"
    for garbage in ("", "a.b", "a.b.c", "x" * 20_000):
        assert check(garbage) in ("not a JWT", "too long")


def test_keys_of_kinds_the_api_server_does_not_sign_with_are_skipped() -> None:
    assert key_from_jwk({"kty": "oct", "kid": "h", "k": "c2VjcmV0"}) is None
    assert key_from_jwk({"kty": "RSA", "kid": "r"}) is None  # no modulus
    assert key_from_jwk({**rsa_jwk(), "alg": "HS256"}) is None


# ---- on a real API server --------------------------------------------------------------


@pytest.mark.cluster
def test_forged_tokens_never_reach_the_token_review_and_a_real_one_does(
    k8s_cluster: DevCluster, k8s_namespace: str
) -> None:
    async def body() -> None:
        kube = await Kube.connect(kubeconfig=str(k8s_cluster.kubeconfig))
        try:
            # A pod the tokens are bound to: it need not run (no node matches).
            created = await kube.request(
                "POST",
                core_path("pods", k8s_namespace),
                {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "metadata": {"name": "bound", "namespace": k8s_namespace},
                    "spec": {
                        "nodeSelector": {"kubetune.io/test": "never"},
                        "containers": [{"name": "c", "image": "none"}],
                    },
                },
            )
            pod = created.body
            assert pod

            async def token_for(audience: str) -> str:
                request = {
                    "apiVersion": "authentication.k8s.io/v1",
                    "kind": "TokenRequest",
                    "spec": {
                        "audiences": [audience],
                        "expirationSeconds": 600,
                        "boundObjectRef": {
                            "kind": "Pod",
                            "apiVersion": "v1",
                            "name": "bound",
                            "uid": pod["metadata"]["uid"],
                        },
                    },
                }
                path = core_path("serviceaccounts", k8s_namespace, "default") + "/token"
                response = await kube.request("POST", path, request)
                return (response.body or {})["status"]["token"]

            keys = ServiceAccountKeys(kube)
            assert await keys.refresh(force=True) and keys.available and keys.issuer
            reviews: list[int] = []
            refused: list[str] = []
            reviewer = TokenReviewer(
                kube, AUDIENCE, on_review=lambda: reviews.append(1), keys=keys,
                on_refused=refused.append,
            )  # fmt: skip
            genuine = await token_for(AUDIENCE)
            kid = json.loads(base64.urlsafe_b64decode(genuine.split(".")[0] + "=="))["kid"]
            assert kid in keys.keys
            claims = json.loads(base64.urlsafe_b64decode(genuine.split(".")[1] + "=="))
            header, payload, _ = genuine.split(".")
            forged_claims = b64(json.dumps({**claims, "exp": time.time() + 3600}).encode())
            forged = {
                "bad signature": sign(claims, kid=kid),  # the API server's key id, our key
                "tampered": f"{header}.{forged_claims}.{genuine.split('.')[2]}",
                "wrong audience": await token_for("https://kubernetes.default.svc"),
                "expired": sign({**claims, "exp": time.time() - 120}, kid=kid),
            }
            for name, token in forged.items():
                assert await reviewer.identify(token) is None, name
            assert reviews == [], "a forged token reached the TokenReview"
            assert refused == ["bad signature", "bad signature", "wrong audience", "bad signature"]
            assert await reviewer.identify(forged["tampered"]) is None
            assert refused[-1] == "refused before"  # the negative cache

            identity = await reviewer.identify(genuine)
            assert identity is not None and identity.pod_uid == pod["metadata"]["uid"]
            assert (identity.namespace, identity.pod_name) == (k8s_namespace, "bound")
            assert await reviewer.identify(genuine) == identity
            assert reviews == [1]  # one review, then the cache
        finally:
            await kube.close()

    asyncio.run(body())
