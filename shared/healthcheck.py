"""Exit 0 if the gRPC server on 127.0.0.1:PORT reports SERVING, else 1.

Usage: ``python -m shared.healthcheck PORT``. It calls grpc.health.v1 Health/Check
for the whole server, over TLS when the INGESTD_TLS_* settings turn it on. Every failure, a timeout included, prints the reason to stderr.
"""

import argparse
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shared.config import SettingsError, load_settings
from shared.tls import channel_credentials


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shared.healthcheck")
    parser.add_argument("port", type=int, help="gRPC port on 127.0.0.1")
    parser.add_argument(
        "--timeout", type=float, default=3.0, help="maximum seconds to wait"
    )
    parser.add_argument(
        "--server-name",
        default=None,
        help="name to expect in the server's TLS certificate when it is not 127.0.0.1",
    )
    args = parser.parse_args(argv)
    target = f"127.0.0.1:{args.port}"
    # A proxy named in http_proxy must not carry a check of a local port.
    options: list[tuple[str, object]] = [("grpc.enable_http_proxy", 0)]
    try:
        settings = load_settings()
    except SettingsError as exc:
        print(f"healthcheck: {exc}", file=sys.stderr)
        return 2
    if settings.tls_enabled:
        if args.server_name:
            options.append(("grpc.ssl_target_name_override", args.server_name))
        channel = grpc.secure_channel(
            target, channel_credentials(settings.tls_ca_file), options
        )
    else:
        channel = grpc.insecure_channel(target, options)
    with channel:
        check = health_pb2_grpc.HealthStub(channel).Check
        try:
            reply = check(health_pb2.HealthCheckRequest(), timeout=args.timeout)
            status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        except grpc.RpcError as exc:
            status = f"{exc.code().name}: {exc.details()}"
    if status == "SERVING":
        return 0
    print(f"health check of {target} failed: {status}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
