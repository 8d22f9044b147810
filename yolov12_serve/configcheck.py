"""`yolov12-serve --check`: the configuration checked as a start would check it, with nothing started.

What `nginx -t` and `promtool check config` are to theirs: after editing cameras.yaml, rotating certificates or
copying in a new model, an operator (or a deployment pipeline) learns whether the server would come up, without
stopping the one that runs. Checked: every flag, the streams file and its URLs (cli.parse_config did those), the
TLS certificates and keys, the token file, the MQTT TLS files, the OPC UA certificate, key and trusted clients,
each engine file's metadata (read, not loaded: no session, no GPU memory taken beside a running server) and every
camera's classes against the model's, and that the state and evidence folders can be written by this user. Not
checked: that the GPUs and the engine's runtime accept the engine (only a start loads it), that the ports are free
(the running server holds them), that the cameras and the MQTT broker answer.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from .config import ServerConfig, StreamSpec
from .errors import ConfigError, InvalidArgumentError
from .ports import host_port
from .security import Security
from .state import STREAMS_FILE, nearest_folder
from .urls import redact_url

__all__ = ["check_config"]


def check_config(config: ServerConfig, streams: list[StreamSpec]) -> list[str]:
    """What a start would use, one line each; ConfigError (or EngineError) for the first thing that stops it."""
    from engines import read_info

    lines = []
    known: set[str] = set()
    for device, path in _engines(config):
        info = read_info(path)
        known |= set(info.names.values())
        names = ", ".join(list(info.names.values())[:8]) + (", ..." if info.nc > 8 else "")
        h, w = info.imgsz
        lines.append(f"engine   {device}: {path} ({info.precision}, input {h}x{w}, batch {info.batch[0]}.."
                     f"{info.batch[1]}, {info.nc} classes: {names})")
    for spec in streams:
        try:
            spec.check_known_classes(known)
        except InvalidArgumentError as e:
            raise ConfigError(str(e)) from None
    tracked = sum(spec.track for spec in streams)
    lines.append(f"cameras  {len(streams)} at start{f' ({tracked} tracked)' if tracked else ''}, their URLs and "
                 "classes checked")
    if config.state_dir:
        lines.append(f"state    {config.state_dir}: {_writable(config.state_dir, '--state-dir')}; "
                     f"{_saved(Path(config.state_dir) / STREAMS_FILE)}")
    if config.evidence_dir:
        lines.append(f"evidence {config.evidence_dir}: {_writable(config.evidence_dir, '--evidence-dir')}, capped at "
                     f"{config.evidence_max_mb:g} MB")
    security = Security(config.security)  # reads and checks the certificates, keys and tokens
    lines.append(f"gRPC     {host_port(config.host, config.port)}, {security.describe()}")
    if config.metrics_port >= 0:
        https = " over HTTPS" if config.security.metrics_tls else ""
        lines.append(f"metrics  {host_port(config.metrics_host or config.host, config.metrics_port)}{https}")
    if config.mqtt is not None:
        cert = f", client certificate {config.mqtt.cert}" if config.mqtt.cert else ""
        sparkplug = f", Sparkplug B edge node {config.mqtt.sparkplug}" if config.mqtt.sparkplug else ""
        lines.append(f"mqtt     {redact_url(config.mqtt.url)}{cert}{sparkplug}")
    if config.opcua is not None:
        lines.append(f"opcua    {_opcua(config)}")
    return lines


def _opcua(config: ServerConfig) -> str:
    """How the OPC UA endpoint would be served (its files checked again: they may have changed since parsing)."""
    from .opcua import load_identity, load_trust, load_users

    options = config.opcua
    assert options is not None
    if not options.secure:
        return f"{options.url}, unencrypted (security None)"
    identity = load_identity(options)
    trusted = (f"{len(load_trust(options.trust))} trusted client certificates and CAs from {options.trust}"
               if options.trust else "any client certificate")
    users = (f"{len(load_users(options.users))} users from {options.users}" if options.users else
             "anonymous sessions")
    return (f"{options.url}, Basic256Sha256 only, certificate {options.cert} (application URI {identity.uri}), "
            f"{trusted}, {users}")


def _engines(config: ServerConfig) -> list[tuple[str, str]]:
    """(devices, engine file) for each file: one for all devices, or one per device."""
    if len(config.engines) == 1:
        return [(",".join(config.devices), config.engines[0])]
    return list(zip(config.devices, config.engines, strict=True))


def _writable(folder: str, flag: str) -> str:
    """How the server would keep files in `folder` ('writable', or created in the nearest folder above that is);
    ConfigError when this user could not."""
    path = Path(folder).expanduser().absolute()
    existing = nearest_folder(folder, flag)
    try:  # a file made and removed: permissions, a read-only mount, a full disk or /proc all answer truly
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".yolov12-check.")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ConfigError(f"{flag} {folder}: {existing} cannot be written by this user (uid {os.getuid()}: "
                          f"{e.strerror or e}); give the server's user a folder of its own") from None
    return "writable" if existing == path else f"to be created (in {existing}, writable)"


def _saved(path: Path) -> str:
    """How many cameras the state folder brings back (added over gRPC earlier), without touching the file."""
    if not path.exists():
        return "no cameras saved yet"
    try:
        saved = json.loads(path.read_text()).get("streams") or []
        return f"{len(saved)} camera{'s' if len(saved) != 1 else ''} saved (restored at start)"
    except (OSError, ValueError, AttributeError, TypeError):
        return f"{path.name} cannot be read: a start sets it aside and logs it"
