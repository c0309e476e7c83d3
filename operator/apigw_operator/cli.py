"""`apigw-operator`: run the operator with kopf."""

from __future__ import annotations

import argparse
import logging

import kopf

from apigw_operator.admission import Webhook, server
from apigw_operator.cluster import Target
from apigw_operator.handlers import Options, build_registry
from apigw_operator.reconciler import CONFIGMAP_LIMIT
from apigw_operator.shards import MAX_SHARDS


def parse_args(argv: list[str] | None = None) -> tuple[Options, argparse.Namespace]:
    parser = argparse.ArgumentParser(prog="apigw-operator", description=__doc__)
    parser.add_argument("-n", "--namespace", action="append", default=[], help="watch CRs in this namespace (repeatable); default: all")
    parser.add_argument("--gateway-namespace", default=Target.namespace, help="namespace of the gateway's ConfigMap, Deployment, pods and the Lease")
    parser.add_argument("--configmap", default=Target.configmap)
    parser.add_argument("--deployment", default=Target.deployment)
    parser.add_argument("--pod-selector", default=Target.pod_selector)
    parser.add_argument("--route-shards", type=int, default=Target.route_shards,
                        help="ConfigMaps <shard-configmap>-1..N for the routes past the first ConfigMap's limit (0: none)")
    parser.add_argument("--shard-configmap", default=Target.shard_configmap)
    parser.add_argument("--resync-interval", type=float, default=Options.resync_interval, help="seconds between full passes")
    parser.add_argument("--liveness", default="http://0.0.0.0:8081/healthz", help="kopf's liveness endpoint URL")
    parser.add_argument("--metrics", default="0.0.0.0:9091", help="HOST:PORT of the operator's Prometheus /metrics")
    parser.add_argument("--configmap-limit", type=int, default=CONFIGMAP_LIMIT,
                        help="bytes the ConfigMap may hold (the API server's limit); a larger routes.yaml is not written")
    parser.add_argument("--webhook", metavar="HOST:PORT",
                        help="serve the validating admission webhook (HTTPS) here; default: none")
    parser.add_argument("--webhook-cert-file", help="the webhook's certificate (PEM), e.g. cert-manager's tls.crt")
    parser.add_argument("--webhook-key-file", help="its private key (PEM), e.g. cert-manager's tls.key")
    parser.add_argument("--no-leader-election", action="store_true", help="write without holding the Lease (one replica only)")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    if not 0 <= args.route_shards <= MAX_SHARDS:
        parser.error(f"--route-shards must be 0 to {MAX_SHARDS}, got {args.route_shards}")
    webhook = None
    if args.webhook:
        if not (args.webhook_cert_file and args.webhook_key_file):
            parser.error("--webhook needs --webhook-cert-file and --webhook-key-file")
        webhook = Webhook(*_address(args.webhook), args.webhook_cert_file, args.webhook_key_file)
    target = Target(args.gateway_namespace, args.configmap, args.deployment, args.pod_selector, args.route_shards,
                    args.shard_configmap)
    options = Options(
        target=target,
        namespaces=tuple(args.namespace),
        resync_interval=args.resync_interval,
        leader_election=not args.no_leader_election,
        metrics=_address(args.metrics),
        configmap_limit=args.configmap_limit,
        webhook=webhook,
    )
    return options, args


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host or "0.0.0.0", int(port)


def main(argv: list[str] | None = None) -> None:
    options, args = parse_args(argv)
    kopf.configure(verbose=args.verbose)
    logging.getLogger("apigw_operator").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    settings = kopf.OperatorSettings()
    settings.scanning.disabled = True  # the CRDs are installed first; no cluster-wide CRD watch (and RBAC) needed
    if options.webhook is not None:  # the ValidatingWebhookConfiguration is in the manifests: kopf manages none
        settings.admission.server = server(options.webhook)
    kopf.run(
        registry=build_registry(options),
        settings=settings,
        standalone=True,  # two replicas are coordinated by the Lease, not by kopf peering
        clusterwide=not options.namespaces,
        namespaces=options.namespaces,
        liveness_endpoint=args.liveness,
    )
