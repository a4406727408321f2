"""A small asyncio Kubernetes client for the handful of calls the operator makes.

Authentication, TLS and kubeconfig handling come from the official client
(`kubernetes.aio`); requests and responses stay plain JSON dicts, which keeps the
operator light (no model classes) and lets the builders' manifests go out unchanged.
Every call treats 409 AlreadyExists and 404 NotFound as answers, not errors.
"""

from __future__ import annotations

import json
import os
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from kubernetes.aio import client as aio_client
from kubernetes.aio import config as aio_config

from kubetune.api import v1alpha1 as api


class KubeError(Exception):
    def __init__(self, status: int, method: str, path: str, body: str) -> None:
        self.status = status
        try:
            detail = json.loads(body).get("message", body)
        except ValueError:
            detail = body
        super().__init__(f"{method} {path}: HTTP {status}: {str(detail)[:500]}")


@dataclass(frozen=True)
class Response:
    status: int
    body: dict[str, Any] | None

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


def ftj_path(namespace: str, name: str | None = None, subresource: str | None = None) -> str:
    path = f"/apis/{api.GROUP}/{api.VERSION}/namespaces/{namespace}/{api.PLURAL}"
    if name:
        path += f"/{name}"
    if subresource:
        path += f"/{subresource}"
    return path


def core_path(kind_plural: str, namespace: str, name: str | None = None) -> str:
    path = f"/api/v1/namespaces/{namespace}/{kind_plural}"
    return f"{path}/{name}" if name else path


def job_path(namespace: str, name: str | None = None) -> str:
    path = f"/apis/batch/v1/namespaces/{namespace}/jobs"
    return f"{path}/{name}" if name else path


def path_for(manifest: dict[str, Any]) -> str:
    """Collection path of a manifest (ConfigMap, Secret, Job, Event, Service, NetworkPolicy)."""
    ns = manifest["metadata"]["namespace"]
    kind = manifest["kind"]
    if kind == "Job":
        return job_path(ns)
    if kind == "NetworkPolicy":
        return f"/apis/networking.k8s.io/v1/namespaces/{ns}/networkpolicies"
    plurals = {"ConfigMap": "configmaps", "Secret": "secrets", "Event": "events"}
    return core_path({**plurals, "Service": "services"}[kind], ns)


def proxy_for(url: str) -> str | None:
    """The proxy HTTPS_PROXY/HTTP_PROXY name for `url`, unless NO_PROXY exempts its host."""
    parts = urlsplit(url)
    proxy = urllib.request.getproxies().get(parts.scheme)
    if not proxy or urllib.request.proxy_bypass(parts.hostname or ""):
        return None
    return proxy


class Kube:
    """JSON over the official asyncio client's authenticated session."""

    def __init__(
        self,
        api_client: aio_client.ApiClient,
        on_write: Callable[[str, str], None] | None = None,
    ) -> None:
        self._api = api_client
        # Called with (method, path) for every request that may change something (metrics).
        self.on_write = on_write

    @classmethod
    async def connect(
        cls,
        kubeconfig: str | None = None,
        pool_size: int = 32,
        on_write: Callable[[str, str], None] | None = None,
    ) -> Kube:
        configuration = aio_client.Configuration()
        if (
            kubeconfig
            or os.environ.get("KUBECONFIG")
            or not os.environ.get("KUBERNETES_SERVICE_HOST")
        ):
            await aio_config.load_kube_config(
                config_file=kubeconfig or os.environ.get("KUBECONFIG"),
                client_configuration=configuration,
            )
        else:
            aio_config.load_incluster_config(client_configuration=configuration)
        configuration.connection_pool_maxsize = pool_size
        # With trust_env, aiohttp reads ~/.netrc and the proxy variables in a worker thread
        # on every request (two thread hops each); resolve the proxy once here instead.
        configuration.client_session_kwargs = {"trust_env": False}
        configuration.proxy = configuration.proxy or proxy_for(configuration.host)
        return cls(aio_client.ApiClient(configuration), on_write=on_write)

    @property
    def api_client(self) -> aio_client.ApiClient:
        """The official client's session, for its typed helpers (leader election)."""
        return self._api

    async def close(self) -> None:
        await self._api.close()

    async def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        content_type: str = "application/json",
        query: dict[str, str] | None = None,
        ok: tuple[int, ...] = (),
        want_body: bool = True,
        accept: str = "application/json",
    ) -> Response:
        """One request; statuses in `ok` (e.g. 404, 409) are returned instead of raised.

        `want_body=False` skips decoding a successful response (a created Secret or Event
        comes back whole, and nobody reads it).
        """
        if self.on_write is not None and method not in ("GET", "HEAD"):
            self.on_write(method, path)
        method_, url, headers, body_, _ = await self._api.param_serialize(
            method=method,
            resource_path=path,
            query_params=list((query or {}).items()) or None,
            header_params={"Content-Type": content_type, "Accept": accept},
            body=body,
            auth_settings=["BearerToken"],
        )
        response = await self._api.call_api(method_, url, header_params=headers, body=body_)
        raw = await response.read()
        if not (200 <= response.status < 300) and response.status not in ok:
            raise KubeError(response.status, method, path, raw.decode(errors="replace"))
        if not want_body:
            return Response(response.status, None)
        try:
            data = json.loads(raw) if raw else None
        except ValueError:
            data = None
        return Response(response.status, data)

    async def get_text(self, path: str, query: dict[str, str] | None = None) -> tuple[int, str]:
        """(status, body) of a plain-text endpoint such as pods/<name>/log."""
        method, url, headers, _, _ = await self._api.param_serialize(
            method="GET",
            resource_path=path,
            query_params=list((query or {}).items()) or None,
            auth_settings=["BearerToken"],
        )
        response = await self._api.call_api(method, url, header_params=headers)
        return response.status, (await response.read()).decode(errors="replace")

    async def get(self, path: str) -> dict[str, Any] | None:
        """The object, or None when it does not exist."""
        response = await self.request("GET", path, ok=(404,))
        return response.body if response.ok else None

    async def create(self, manifest: dict[str, Any]) -> tuple[dict[str, Any] | None, bool]:
        """(object, created): object is None when one of that name already exists."""
        response = await self.request("POST", path_for(manifest), manifest, ok=(409,))
        return (response.body, True) if response.ok else (None, False)

    async def create_quietly(self, manifest: dict[str, Any]) -> bool:
        """Create without reading the result back: True if created, False if it existed."""
        response = await self.request(
            "POST", path_for(manifest), manifest, ok=(409,), want_body=False
        )
        return response.ok

    async def merge_patch(self, path: str, patch: dict[str, Any]) -> dict[str, Any] | None:
        """Patched object, or None when it is gone."""
        response = await self.request(
            "PATCH", path, patch, content_type="application/merge-patch+json", ok=(404,)
        )
        return response.body if response.ok else None

    async def merge_patch_quietly(self, path: str, patch: dict[str, Any]) -> bool:
        """Patch without reading the result back: False when the object is gone."""
        response = await self.request(
            "PATCH",
            path,
            patch,
            content_type="application/merge-patch+json",
            ok=(404,),
            want_body=False,
        )
        return response.ok

    async def delete(self, path: str, propagation: str = "Background") -> bool:
        body = {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": propagation}
        response = await self.request("DELETE", path, body, ok=(404,))
        return response.ok
