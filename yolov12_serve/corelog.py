"""gRPC core's own log lines: errors only, unless GRPC_VERBOSITY says otherwise. Imported by the package's
__init__, so before anything of ours imports grpc (core reads the variable once, when it loads: setting it later
changes nothing); yolov12-ctl and the Python client are spared the lines too.

Left at its default, gRPC core writes an INFO line of its own format (`I1207 15:49:23.150361 ...
ssl_transport_security.cc:2563] Handshake failed ...`) to stderr for every connection to a TLS port that does
not speak TLS: any peer that can reach the port, with no certificate or token, wrote a line per connection (10 a
second: 864,000 lines a day), past --log-level. The refusal is the peer's business, not the operator's.
"""

from __future__ import annotations

import os

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
