"""`--health-port`: grpc.health.v1 alone on a plaintext port, for probes that cannot speak TLS.

Kubernetes' native gRPC probes (and most load balancers' health checks) connect without TLS and without a client
certificate, so once the main port has --tls-cert they can no longer ask it. This second port serves only the
Health service (the same servicer as the main port: the same SERVING / NOT_SERVING), no token needed; it tells
nothing but whether the server serves. Bind it to an address only the probes reach (the pod network, 127.0.0.1).
"""

from __future__ import annotations

import grpc
from grpc_health.v1 import health, health_pb2_grpc

from .ports import check_bindable

__all__ = ["start_health_port"]


async def start_health_port(servicer: health.aio.HealthServicer, host: str, port: int) -> tuple[grpc.aio.Server, int]:
    """Serve `servicer` alone on host:port (0: any free port), plaintext; returns the server and the bound port
    (OSError naming the flag when it cannot bind)."""
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    check_bindable(address, "health checks", "--health-port")
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0), ("grpc.max_receive_message_length", 4096)])
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError:
        bound = 0
    if bound == 0:
        raise OSError(f"cannot listen for health checks on {address}: pick another --health-port (0: any free port)")
    await server.start()
    return server, bound
