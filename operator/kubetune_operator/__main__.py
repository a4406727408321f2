"""`kubetune-operator` / `python -m kubetune_operator`: run the operator.

Flags override KUBETUNE_OPERATOR_* environment variables (see settings.py and
docs/operator.md). The Kubernetes connection is the usual one: KUBECONFIG or
~/.kube/config, or the in-cluster service account.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys

import kopf

from kubetune_operator.settings import (
    ENV_PREFIX,
    OperatorSettings,
    describe_error,
    parse_env_value,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kubetune-operator", description=__doc__.splitlines()[0])
    p.add_argument(
        "-n", "--namespace", action="append", dest="namespaces",
        help="namespace to watch (repeatable; default: all namespaces)",
    )  # fmt: skip
    p.add_argument("--trainer-image", help="default trainer image")
    p.add_argument("--trainer-command", help="trainer command line, e.g. 'kubetune-trainer'")
    p.add_argument("--s3-endpoint", help="AWS_ENDPOINT_URL for trainer pods")
    p.add_argument("--s3-region", help="AWS_REGION for trainer pods whose Secret has none")
    p.add_argument(
        "--default-credentials-secret",
        help="S3 credentials Secret of jobs without spec.output.credentialsSecretRef",
    )
    p.add_argument(
        "--default-node-selector",
        metavar="JSON",
        help='trainer nodeSelector when a job sets none, e.g. \'{"gpu": "h100"}\'',
    )
    p.add_argument(
        "--default-tolerations",
        metavar="JSON",
        help="trainer tolerations when a job sets none (JSON list)",
    )
    p.add_argument("--progress-base-url", help="URL trainer pods reach this operator at")
    p.add_argument("--listen-host", help="address of the progress/metrics/health server")
    p.add_argument("--listen-port", type=int, help="its port (0: any free port)")
    p.add_argument("--patch-interval", type=float, dest="patch_interval_s",
                   help="seconds between progress-only status patches (default 5)")  # fmt: skip
    p.add_argument("--allowed-schemes", help="comma-separated URI schemes (default hf,s3,pvc)")
    p.add_argument("--gpu-memory-gib", type=float, help="memory of one GPU (default 80)")
    p.add_argument("--log-format", choices=["json", "text"])
    p.add_argument("--verbose", action="store_true", help="debug logging")
    return p


def settings_from_args(args: argparse.Namespace) -> OperatorSettings:
    overrides = {
        "namespaces": args.namespaces,
        "trainer_image": args.trainer_image,
        "trainer_command": args.trainer_command.split() if args.trainer_command else None,
        "s3_endpoint": args.s3_endpoint,
        "s3_region": args.s3_region,
        "default_credentials_secret": args.default_credentials_secret,
        "default_node_selector": _json_flag("default_node_selector", args.default_node_selector),
        "default_tolerations": _json_flag("default_tolerations", args.default_tolerations),
        "progress_base_url": args.progress_base_url,
        "listen_host": args.listen_host,
        "listen_port": args.listen_port,
        "patch_interval_s": args.patch_interval_s,
        "allowed_schemes": args.allowed_schemes.split(",") if args.allowed_schemes else None,
        "gpu_memory_gib": args.gpu_memory_gib,
        "log_format": args.log_format,
    }
    return OperatorSettings.from_env(**overrides)


def _json_flag(field: str, raw: str | None) -> object:
    if raw is None:
        return None
    flag = "--" + field.replace("_", "-")
    return parse_env_value(flag, raw, OperatorSettings.model_fields[field].annotation)


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
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
