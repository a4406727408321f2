"""`kubetune-operator` / `python -m kubetune_operator`: run the operator.

Flags override KUBETUNE_OPERATOR_* environment variables (see settings.py and
docs/operator.md). The Kubernetes connection is the usual one: KUBECONFIG or
~/.kube/config, or the in-cluster service account.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import socket
import sys

import kopf

from kubetune_operator.settings import (
    ENV_PREFIX,
    OperatorSettings,
    describe_error,
    parse_setting,
)

# Flags whose name is not simply --<setting-with-dashes> (kept for existing users).
FLAG_ALIASES = {
    "namespaces": ("-n", "--namespace"),
    "patch_interval_s": ("--patch-interval",),
}


def flag_names(field: str) -> tuple[str, ...]:
    return FLAG_ALIASES.get(field, ("--" + field.replace("_", "-"),))


def build_parser() -> argparse.ArgumentParser:
    """One flag per OperatorSettings field, described by the field itself."""
    p = argparse.ArgumentParser(prog="kubetune-operator", description=__doc__.splitlines()[0])
    for field, info in OperatorSettings.model_fields.items():
        default = info.get_default(call_default_factory=True)
        shown = json.dumps(default) if isinstance(default, list | dict | bool) else default
        help_text = f"{info.description} (default: {shown}; env {ENV_PREFIX}{field.upper()})"
        help_text = help_text.replace("%", "%%")  # argparse formats help with %
        if field == "namespaces":  # repeatable as well as comma-separated
            p.add_argument(*flag_names(field), dest=field, action="append", help=help_text)
        else:
            p.add_argument(*flag_names(field), dest=field, metavar="VALUE", help=help_text)
    p.add_argument("--verbose", action="store_true", help="debug logging")
    return p


def settings_from_args(args: argparse.Namespace) -> OperatorSettings:
    """Settings from the environment, each flag given overriding its variable; a flag's text
    is read the way its variable's is (lists comma-separated or JSON, mappings JSON)."""
    overrides = {}
    for field in OperatorSettings.model_fields:
        raw = getattr(args, field)
        if raw is not None:
            text = ",".join(raw) if isinstance(raw, list) else raw
            overrides[field] = parse_setting(flag_names(field)[-1], field, text)
    return OperatorSettings.from_env(**overrides)


def kopf_settings(settings: OperatorSettings) -> kopf.OperatorSettings:
    """kopf's own settings that follow from ours (the startup handler sets the rest)."""
    config = kopf.OperatorSettings()
    # Serving listed namespaces, kopf would list and watch all namespaces and CRDs to follow
    # them, which needs cluster-scoped RBAC (and logs "Not enough permissions" without it).
    # The namespaces are fixed and the CRD is installed first, so read both once instead.
    config.scanning.disabled = bool(settings.namespaces)
    return config


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = settings_from_args(args)
    except ValueError as exc:  # pydantic's ValidationError is a ValueError too
        message = f"invalid settings (flags or {ENV_PREFIX}*): {describe_error(exc)}"
        parser.exit(2, f"kubetune-operator: {message}\n")
    kopf.configure(
        verbose=args.verbose,
        log_format=kopf.LogFormat.JSON if settings.log_format == "json" else kopf.LogFormat.FULL,
    )
    if not args.verbose:
        # kopf logs every handled watch event at INFO: thousands of lines for nothing.
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    import kubetune_operator.handlers  # noqa: F401  (registers the handlers)

    memo = kopf.Memo(settings=settings)
    namespaces = settings.namespaces
    # Ctrl-C is the ordinary way to stop it.
    with contextlib.suppress(KeyboardInterrupt, asyncio.CancelledError):
        kopf.run(
            standalone=True,
            clusterwide=not namespaces,
            namespaces=namespaces,
            memo=memo,
            settings=kopf_settings(settings),
            identity=own_identity(),  # type: ignore[arg-type]  # kopf.Identity is a NewType of str
        )
    return 0


def own_identity() -> str:
    """This operator's name for kopf, without kopf's default lookup of the user name: a
    container running as a UID the image's /etc/passwd lacks (the chart's 65532, or
    OpenShift's arbitrary UIDs) has none, and kopf's getpass.getuser() would crash."""
    return f"{socket.gethostname()}/{os.getpid()}"


if __name__ == "__main__":
    sys.exit(main())
