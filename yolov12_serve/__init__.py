"""yolov12-serve: the real-time multi-camera detection server (gRPC in and out, Prometheus metrics).

Layers, one way: api (gRPC) -> core (stream registry, placement) -> sources (RTSP, push, synthetic)
-> mailbox (newest frame wins) -> scheduler (deadline-aware batching) -> worker (engine instances)
-> fanout (bounded queue per subscriber). Nothing here imports torch.
"""

__version__ = "0.1.0"

from . import corelog  # noqa: F401 - before anything imports grpc (server, yolov12-ctl, the client alike)
