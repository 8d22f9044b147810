"""A process per device (`--worker-processes`): the API process keeps gRPC, the stream registry, placement, device
health, metrics and the fan-out; each device process (host.py) keeps its engine, scheduler, worker threads and
the decoders of the cameras placed on it. remote.py is the API side (RemoteRuntime where a DeviceRuntime stands),
ipc.py the wire. Decoded frames never cross; pushed frames cross as their encoded bytes; results cross as tuples
batched every few ms. core.py's ProcessDevices part (processes.py) acts on the events.
"""

from .host import WorkerSpec
from .remote import RemoteLoaded, RemoteRuntime, RemoteSource

__all__ = ["RemoteLoaded", "RemoteRuntime", "RemoteSource", "WorkerSpec"]
