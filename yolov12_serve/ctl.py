"""`yolov12-ctl`: run a yolov12-serve server from a shell (cameras, detections, health, engines) over its gRPC API.

    yolov12-ctl add line1-cam1 rtsp://10.0.0.5/stream1 --max-fps 10
    yolov12-ctl streams                          # a table: state, device, fps, latency, drops, last error
    yolov12-ctl apply cameras.yaml --prune       # the cameras become those of the file, no restart
    yolov12-ctl watch line1-cam1 --count 100 --json
    yolov12-ctl detect part.jpg --save drawn/    # boxes drawn on a copy of each image
    yolov12-ctl snapshot line1-cam1 cam1.jpg --draw   # what the camera sees now, its zone and boxes drawn
    yolov12-ctl --server detector.plant:50051 --tls-ca ca.crt --token-file viewer.token info

`--server` (or YOLOV12_SERVER, comma-separated) names one server, or every replica of a sharded deployment in
shard order: cameras are then routed to their owner as `ShardedClient` does. A failed call is one line on stderr
with the gRPC status and what to do, exit status 1; a bad argument or file exit 2; Ctrl-C 130.
"""

from __future__ import annotations

import argparse
import json
import os
import ssl
import sys
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any, TextIO

import grpc

from . import __version__
from .argparsing import OneLineParser
from .client import Client, lacks_port, make_frame, message_dict, new_objects, object_dict
from .config import STREAM_KEYS, StreamSpec, load_streams_file, redact_url, url_kind
from .errors import ANSWERED_BY_SERVER, ConfigError, InvalidArgumentError
from .filters import zone_from_flat
from .proto import detector_pb2 as pb
from .routing import ShardedClient
from .tls import load_key_pair

__all__ = ["main"]

DEFAULT_SERVER = "localhost:50051"
ZONE_COLOUR = (255, 221, 0)  # a camera's zone outline in `snapshot --draw` (yellow: seen on grey belts and dark parts)
HINTS = {  # what to do about a refused call, by status code
    grpc.StatusCode.UNAVAILABLE: "is the server running and reachable there? (--server, or YOLOV12_SERVER; "
                                 "--tls-ca for a server with TLS)",
    grpc.StatusCode.UNAUTHENTICATED: "the server wants a token: --token-file FILE (or YOLOV12_TOKEN)",
    grpc.StatusCode.PERMISSION_DENIED: "use a token with the role the message names",
    grpc.StatusCode.DEADLINE_EXCEEDED: "the server did not answer in time: --timeout S",
    grpc.StatusCode.UNIMPLEMENTED: "the server does not offer this call: is --server its gRPC --port (not its "
                                   "--health-port, which answers health only), and is it as new as this yolov12-ctl?",
}
TOKEN_REFUSED_HINT = ("the token given (--token-file, or YOLOV12_TOKEN) is not in the server's --auth-token-file: "
                      "check the file, or ask for the new token if the server's were rotated")
CA_REFUSED_HINT = "the server's certificate is not signed by --tls-ca: give the CA that signed it"
NAME_REFUSED_HINT = ("the server's certificate is not for this host name: connect by a name it holds, or give it with "
                     "--server-name")
MUTUAL_TLS_HINT = ("is the server running and reachable there? A server with mutual TLS (--tls-client-ca) closes "
                   "the connection of a client {}")
PLAINTEXT_SERVER_HINT = ("the server there speaks plaintext, not TLS: leave out --tls-ca (or start it with --tls-cert "
                         "and --tls-key)")


GRPC_SCHEMES = ("dns", "unix", "unix-abstract", "ipv4", "ipv6")  # gRPC target forms --server also takes
SERVER_SAYS_UNAVAILABLE = ("the server is ", "cannot save the stream set")  # how the server's own UNAVAILABLE begin


class UsageError(Exception):
    """A bad argument or unreadable file: one line, exit status 2."""


def seconds(text: str) -> float:
    """argparse type: a number of seconds above 0 (its name is what argparse's message calls it)."""
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, got {text}")
    return value


def count(text: str) -> int:
    """argparse type: a count of 0 or more."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def zone(text: str) -> list[tuple[float, float]]:
    """argparse type: x,y pairs 'X0,Y0,X1,Y1,...' (fractions of the frame, at least three points)."""
    try:
        values = [float(v) for v in text.replace(" ", ",").split(",") if v]
        return list(zone_from_flat(values))
    except InvalidArgumentError as e:  # before ValueError: it is one
        raise argparse.ArgumentTypeError(str(e)) from None
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers X0,Y0,X1,Y1,... got {text!r}") from None


def class_score(text: str) -> tuple[str, float]:
    """argparse type: NAME=SCORE."""
    name, eq, score = text.rpartition("=")
    try:
        if not eq or not name.strip():
            raise ValueError
        return name.strip(), float(score)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected CLASS=SCORE such as dent=0.3, got {text!r}") from None


def class_list(text: str) -> list[str]:
    """argparse type: comma-separated class names."""
    return [n.strip() for n in text.split(",") if n.strip()]


class _Parser(OneLineParser):
    error_format = "yolov12-ctl: {message} (see --help)"  # sub-commands' messages too (their prog is longer)


def _common_options(parser: argparse.ArgumentParser) -> None:
    """The options every command takes, before or after its name ("watch cam1 --json" reads as meant)."""
    parser.add_argument("--server", action="append", metavar="HOST:PORT",
                        help="the server; repeat for every replica of a sharded deployment, in shard order "
                        f"(default: $YOLOV12_SERVER, comma-separated, else {DEFAULT_SERVER}); no default port: "
                        "only with TLS may it be left out (443)")
    parser.add_argument("--tls-ca", metavar="FILE", help="CA certificate that signed the server's (turns TLS on)")
    parser.add_argument("--cert", metavar="FILE", help="this client's certificate, for a server with --tls-client-ca")
    parser.add_argument("--key", metavar="FILE", help="this client's key (with --cert)")
    parser.add_argument("--server-name", help="check the server's certificate for this name instead of the host's")
    parser.add_argument("--token-file", metavar="FILE",
                        help="file holding the bearer token (without it: the token itself from $YOLOV12_TOKEN)")
    parser.add_argument("--timeout", type=seconds, help="seconds a call may take (default: 10)")
    parser.add_argument("--json", action="store_true", help="JSON output, one object per line (for scripts)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="yolov12-ctl", description="Control a running yolov12-serve: add and remove cameras, list "
                "them, watch detections, detect images, check health, swap engines.",
                epilog="Exit status: 0 done, 1 the server refused or could not be reached (the line says why), "
                "2 bad arguments, 130 interrupted.")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    _common_options(p)
    p.set_defaults(timeout=10.0)
    commands = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def sub(name: str, help: str) -> argparse.ArgumentParser:  # its common options default to the main parser's
        parser = commands.add_parser(name, help=help, description=help, argument_default=argparse.SUPPRESS)
        _common_options(parser)
        return parser

    sub("streams", "every camera: state, device, fps, latency, drops, last error")
    add = sub("add", "have the server pull a camera")
    add.add_argument("stream_id", help="camera id: 1..128 printable characters, no spaces")
    add.add_argument("url", help="rtsp://, rtsps://, synthetic://NAME (with --allow-synthetic) or a file "
                     "(with --allow-files)")
    add.add_argument("--max-fps", type=float, default=0.0, help="frames per second to detect on (default: all)")
    add.add_argument("--min-score", type=float, default=0.0,
                     help="publish only detections scoring at least this, 0..1 (default 0: all the engine returns)")
    add.add_argument("--class-min-score", type=class_score, action="append", default=[], metavar="CLASS=SCORE",
                     dest="class_min_scores", help="a score of its own for a class instead of --min-score (repeat for "
                     "others), e.g. --class-min-score dent=0.3")
    add.add_argument("--classes", type=class_list, default=[], metavar="NAME,NAME",
                     help="publish only detections of these classes, as the model names them (default: all)")
    add.add_argument("--blind-after-s", type=float, default=None, metavar="S",
                     help="report its picture blank or frozen after S seconds (0: never; default: the server's)")
    add.add_argument("--track", action="store_true", default=False,
                     help="follow each object from frame to frame: its detections carry a track id, and "
                     "yolov12_objects_total counts objects (a part on a belt once, not once per frame)")
    add.add_argument("--zone", type=zone, default=[], metavar="X,Y,X,Y,X,Y",
                     help="publish only detections whose box centre lies in this polygon, its corners as fractions "
                     "of the frame's width and height (0,0 top left; e.g. 0,.3,1,.3,1,.8,0,.8; default: all)")
    rm = sub("remove", "stop cameras")
    rm.add_argument("stream_ids", nargs="+", metavar="STREAM_ID",
                    help="cameras to stop (one of the server's --streams file comes back at its next SIGHUP or "
                         "restart: take it out of the file too)")
    apply = sub("apply", "make the server's cameras those of a streams file (the --streams format): add the missing, "
                "replace those whose URL, max_fps, min_score, class_min_scores, classes, zone, blind_after_s or track "
                "changed, and with "
                "--prune remove the others; a file with a URL scheme or a class name the server does not know changes "
                "nothing")
    apply.add_argument("file", help=f"YAML: streams: [{{{', '.join(STREAM_KEYS)}}}] (docs/production.md)")
    apply.add_argument("--prune", action="store_true", default=False,
                       help="also remove the cameras the file does not list (pushed streams are never touched)")
    apply.add_argument("--dry-run", action="store_true", default=False, help="print what would change, change nothing")
    apply.add_argument("--replace", action="append", default=[], metavar="STREAM_ID",
                       help="replace this camera even if it looks unchanged (repeatable): ListStreams masks passwords, "
                            "so a camera's new password is not seen otherwise")
    watch = sub("watch", "detections as they are published, one line per frame")
    watch.add_argument("stream_ids", nargs="*", default=[], metavar="STREAM_ID", help="cameras to watch (default: all)")
    watch.add_argument("--count", type=count, default=0, help="stop after this many frames (default: never)")
    watch.add_argument("--duration", type=seconds, default=None, help="stop after this many seconds (default: never)")
    watch.add_argument("--follow", action="store_true", default=False,
                       help="go on through server restarts and outages, trying again until the server is back (a "
                            "note on stderr at each gap); without it the watch ends when the server does")
    watch.add_argument("--objects", action="store_true", default=False,
                       help="a line per object of tracked cameras (AddStream track), when first seen, not per frame: "
                       "what a system recording each defect once receives (--count counts objects)")
    detect = sub("detect", "detections for image files or folders of them (JPEG, PNG; BMP, TIFF, WebP sent as PNG) "
                 "pushed to the server")
    detect.add_argument("images", nargs="+", metavar="IMAGE", help="image files, or folders of them")
    detect.add_argument("--save", metavar="DIR", default=None,
                        help="also write each image with its boxes drawn into DIR, under its own name")
    snap = sub("snapshot", "a camera's next picture, full size, saved as an image file (to aim it, to set its zone)")
    snap.add_argument("stream_id", help="the camera")
    snap.add_argument("file", help="where to save it (.jpg as the server sends it; .png and others converted)")
    snap.add_argument("--draw", action="store_true", default=False,
                      help="draw the camera's zone and the detections in the picture that the camera would publish "
                      "(its min_score, class_min_scores, classes and zone applied)")
    sub("info", "engines, devices and their health, classes, SLO")
    sub("health", "SERVING or not, per server (exit 0 only when every one serves)")
    reload = sub("reload", "swap in engine files while streams flow (none: the same files again)")
    reload.add_argument("engines", nargs="*", default=[], metavar="ENGINE",
                        help="engine files on the server's machine, by absolute path (a relative one that exists here "
                        "is made absolute: the server's working directory is not this shell's)")
    return p


def _servers(args: argparse.Namespace) -> list[str]:
    given = args.server or [s for s in os.environ.get("YOLOV12_SERVER", "").split(",") if s.strip()]
    servers = [s.strip() for s in given] or [DEFAULT_SERVER]
    tls = any(v is not None for v in (args.tls_ca, args.cert, args.server_name))
    for server in servers:
        _check_server(server, tls)
    return servers


def _check_server(server: str, tls: bool = False) -> None:
    """UsageError unless `server` is HOST:PORT (or a gRPC target such as dns:///HOST:PORT or unix:PATH): a typo
    there otherwise read as a server that is down. With TLS the port may be left out (443, a gateway's), as in
    Client."""
    if lacks_port(server):
        if tls:
            return
        raise UsageError(f"--server {server!r} has no port: add it, such as {server}:50051 (plaintext would go to "
                         "gRPC's default 443; a TLS gateway there: give --tls-ca)")
    scheme = server.split(":", 1)[0]
    if scheme in GRPC_SCHEMES and server.startswith(f"{scheme}:") and len(server) > len(scheme) + 1:
        return
    host, _, port = server.rpartition(":")
    if "://" in server or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise UsageError(f"--server {server!r}: expected HOST:PORT such as localhost:50051 (no http://)")
    if ":" in host and not (host.startswith("[") and host.endswith("]")):  # gRPC: "Misformatted domain name"
        raise UsageError(f"--server {server!r}: an IPv6 address goes in brackets before the port, such as "
                         "[::1]:50051")


def _token(args: argparse.Namespace) -> str | None:
    if args.token_file is None:
        return os.environ.get("YOLOV12_TOKEN") or None
    try:
        token = Path(args.token_file).read_text().strip()
    except OSError as e:
        raise UsageError(f"cannot read the token file: {e.strerror}: {args.token_file}") from None
    except UnicodeDecodeError:
        raise UsageError(f"{args.token_file} is not a text file: it must hold the token alone (one line, no "
                         "spaces)") from None
    if not token or any(c.isspace() for c in token):
        raise UsageError(f"{args.token_file} must hold the token alone (one line, no spaces)")
    return token


def _client_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    if (args.cert is None) != (args.key is None):
        raise UsageError("--cert and --key go together (mutual TLS)")
    for flag, path in (("--tls-ca", args.tls_ca), ("--cert", args.cert), ("--key", args.key)):
        if path is None:
            continue
        try:
            head = Path(path).read_bytes()[:64 * 1024]
        except IsADirectoryError:
            raise UsageError(f"{flag} {path} is a directory: give the PEM file") from None
        except OSError as e:
            raise UsageError(f"{flag} {path}: {e.strerror or e}") from None
        if b"-----BEGIN " not in head:  # gRPC would log its own lines and then fail to connect, "unreachable"
            raise UsageError(f"{flag} {path} is not a PEM file (-----BEGIN ...-----)")
    if args.cert is not None:  # a key of another certificate, or an encrypted one: gRPC too says "unreachable"
        try:
            load_key_pair(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), args.cert, args.key, "--cert", "--key")
        except ConfigError as e:
            raise UsageError(str(e)) from None
    return {"timeout": args.timeout, "tls_ca": args.tls_ca, "cert": args.cert, "key": args.key,
            "server_name": args.server_name, "token": _token(args)}


def _state(value: int) -> str:
    return pb.StreamState.Name(value).removeprefix("STREAM_STATE_")


def _table(rows: Sequence[Sequence[str]], out: TextIO) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        out.write("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() + "\n")


def _print_streams(streams: Sequence[pb.StreamInfo], as_json: bool, out: TextIO) -> int:
    if as_json:
        for s in streams:
            out.write(json.dumps({**message_dict(s), "state": _state(s.state)}) + "\n")
        return 0
    if not streams:
        out.write("no streams (add one: yolov12-ctl add ID URL)\n")
        return 0
    rows = [("STREAM", "STATE", "DEVICE", "FPS", "P50 MS", "P99 MS", "PROCESSED", "DROPPED", "RECONNECTS", "OBJECTS",
             "SIZE", "URL", "LAST ERROR")]
    for s in streams:
        state = _state(s.state) + (f" ({s.picture_problem})" if s.picture_problem else "")  # e.g. STREAMING (blank)
        device = (s.device or "-") + (f"/{s.decoder}" if s.decoder and s.device != "cpu" else "")  # cuda:0/nvdec
        rows.append((s.stream_id, state, device, f"{s.fps:.1f}", f"{s.latency_p50_ms:.1f}",
                     f"{s.latency_p99_ms:.1f}", str(s.frames_processed), str(s.frames_dropped), str(s.reconnects),
                     str(s.objects) if s.track else "-", f"{s.width}x{s.height}" if s.width else "-", s.url,
                     _last_error(s)))
    _table(rows, out)
    return 0


def _last_error(s: pb.StreamInfo) -> str:
    """'connection refused (2 s ago, failing for 1 h)': when it last happened, and since when the camera fails."""
    if not s.last_error:
        return ""
    since = f", failing for {_span(s.failing_for_s)}" if s.failing_for_s >= s.last_error_age_s + 1 else ""
    return f"{s.last_error} ({_ago(s.last_error_age_s)}{since})"


def _span(seconds: float) -> str:
    """'40 s', '12 min', '3 h', '2 d'."""
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{int(seconds // size)} {unit}"
    return f"{int(seconds)} s"


def _ago(seconds: float) -> str:
    """'40 s ago', '12 min ago', '3 h ago', '2 d ago': whether a camera's last error is news or history."""
    return f"{_span(seconds)} ago"


def _describe(fd: pb.FrameDetections) -> str:
    who = f"{fd.stream_id} #{fd.frame_id}" if fd.stream_id else f"#{fd.frame_id}"  # detect: the file names it
    if fd.error:
        return f"{who}: error: {fd.error}"
    boxes = ", ".join(f"{d.class_name or d.class_id}{f' [{d.track_id}]' if d.track_id else ''} {d.score:.2f} "
                      f"({d.x1:.0f},{d.y1:.0f},{d.x2:.0f},{d.y2:.0f})" for d in fd.detections)
    return (f"{who} {fd.width}x{fd.height} {fd.latency_ms:.1f} ms: "
            f"{len(fd.detections)} detection{'' if len(fd.detections) == 1 else 's'}{': ' + boxes if boxes else ''}")


def _watch(c: Client | ShardedClient, args: argparse.Namespace, out: TextIO) -> int:
    def note(text: str) -> None:
        print(f"yolov12-ctl: {text}", file=sys.stderr, flush=True)

    if args.objects and not args.follow:  # (with --follow the server may be down now: it is waited for)
        listed = [s for s in c.list_streams() if not args.stream_ids or s.stream_id in args.stream_ids]
        if listed and not any(s.track for s in listed):  # else it would wait for ever, printing nothing
            what = "this camera does not track" if len(listed) == 1 else "none of these cameras tracks"
            raise UsageError(f"--objects: {what} objects, so none would come: add cameras with --track "
                             "(yolov12-ctl add ID URL --track, or track: true in a streams file)")
    watch = c.watch(args.stream_ids, timeout=args.duration or None, follow=args.follow, on_gap=note)
    seen = 0
    lines = (_describe_object(fd, d, args.json) for fd, d in new_objects(watch)) if args.objects else \
        (json.dumps(message_dict(fd)) if args.json else _describe(fd) for fd in watch)
    try:
        for line in lines:
            out.write(line + "\n")
            out.flush()
            seen += 1
            if args.count and seen >= args.count:
                break
    except grpc.RpcError as e:
        if e.code() != grpc.StatusCode.DEADLINE_EXCEEDED or not args.duration:
            raise
    finally:
        watch.cancel()
    return 0


def _describe_object(fd: pb.FrameDetections, d: pb.Detection, as_json: bool) -> str:
    """One object when first seen: a line ('belt [12] dent 0.91 (x1,y1,x2,y2) #frame at TIME') or a JSON object."""
    record = object_dict(fd, d)
    if as_json:
        return json.dumps(record)
    return (f"{fd.stream_id} [{d.track_id}] {d.class_name or d.class_id} {d.score:.2f} "
            f"({d.x1:.0f},{d.y1:.0f},{d.x2:.0f},{d.y2:.0f}) #{fd.frame_id} at {record['time']}")


def _remove(c: Client | ShardedClient, args: argparse.Namespace, out: TextIO) -> int:
    """Remove each camera named; one that cannot be removed is a line on stderr, the others still go (exit 1)."""
    removed, failed = [], 0
    for sid in args.stream_ids:
        try:
            removed.append(c.remove_stream(sid))
        except grpc.RpcError as e:
            if len(args.stream_ids) == 1:
                raise
            failed += 1
            print(f"yolov12-ctl: remove {sid}: {_one_line(e, _servers(args), args)}", file=sys.stderr, flush=True)
    if removed:
        _print_streams(removed, args.json, out)
    return 1 if failed else 0


def _image_files(named: Sequence[str]) -> list[str]:
    """The files named, a folder standing for the images in it (by name; not its subfolders)."""
    from .predict.inputs import IMAGE_SUFFIXES

    files: list[str] = []
    for name in named:
        folder = Path(name)
        if not folder.is_dir():
            files.append(name)
            continue
        found = sorted(str(f) for f in folder.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        if not found:
            raise UsageError(f"no images in {name} (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
        files += found
    return files


def _detect(c: Client, args: argparse.Namespace, out: TextIO) -> int:
    for path in _image_files(args.images):
        try:
            data = Path(path).read_bytes()
        except OSError as e:
            raise UsageError(f"cannot read {path}: {e.strerror}") from None
        try:
            frame = make_frame(data)  # JPEG and PNG as they are; BMP, TIFF, WebP... as PNG
        except ValueError as e:
            raise UsageError(f"{path}: {e}") from None
        if frame.data[:3] != b"\xff\xd8\xff" and frame.data[:8] != b"\x89PNG\r\n\x1a\n":  # nothing Pillow reads
            raise UsageError(f"{path} is not an image (JPEG, PNG, BMP, TIFF, WebP, ... are)")
        fd = c.detect_image(frame)
        drawn = {} if args.save is None else {"saved": _save_drawn(path, fd, Path(args.save))}
        out.write((json.dumps({"image": path, **drawn, **message_dict(fd)}) if args.json else
                   f"{path}: {_describe(fd)}" + (f" (drawn in {drawn['saved']})" if drawn else "")) + "\n")
    return 0


def _save_drawn(path: str, fd: pb.FrameDetections, folder: Path) -> str:
    """`path` turned upright (as the server saw it) with `fd`'s boxes drawn, written to FOLDER/NAME; the path."""
    import numpy as np
    from PIL import Image

    from .drawing import draw_boxes
    from .predict.inputs import load_rgb

    dets = np.array([[d.x1, d.y1, d.x2, d.y2, d.score, d.class_id] for d in fd.detections], np.float32)
    target = folder / Path(path).name
    if target.resolve() == Path(path).resolve():
        raise UsageError(f"--save {folder} is where {path} is: pick another folder (it would be overwritten)")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(draw_boxes(load_rgb(path), dets, {d.class_id: d.class_name for d in fd.detections})).save(
            target)
    except OSError as e:
        raise UsageError(f"cannot write the drawn image into {folder}: {e.strerror or e}") from None
    return str(target)


def _snapshot(c: Client | ShardedClient, args: argparse.Namespace, out: TextIO) -> int:
    import io

    from PIL import Image

    target = Path(args.file)
    if target.is_dir():  # Pillow said "unknown file extension: "
        raise UsageError(f"{target} is a folder: give a file name such as {target / 'cam1.jpg'}")
    shot = c.snapshot(args.stream_id)
    drawn = _draw_snapshot(c, shot) if args.draw else None
    try:
        if drawn is None and target.suffix.lower() in (".jpg", ".jpeg"):
            target.write_bytes(shot.jpeg)
        else:
            picture = drawn[0] if drawn is not None else Image.open(io.BytesIO(shot.jpeg))
            picture.save(target)
    except (OSError, ValueError) as e:  # ValueError: a suffix Pillow has no format for
        raise UsageError(f"cannot save {target}: {getattr(e, 'strerror', None) or e}") from None
    found = {} if drawn is None else {"detections": drawn[1]}
    what = "" if drawn is None else \
        f", {'its zone and ' if drawn[2] else ''}{drawn[1]} detection{'' if drawn[1] == 1 else 's'} drawn"
    out.write((json.dumps({"stream_id": shot.stream_id, "saved": str(target), "width": shot.width,
                           "height": shot.height, **found}) if args.json else
               f"{target}: {shot.stream_id} {shot.width}x{shot.height}{what}") + "\n")
    return 0


def _draw_snapshot(c: Client | ShardedClient, shot: pb.Snapshot) -> tuple[Any, int, bool]:
    """The picture with the camera's zone outlined and the detections it would publish (DetectImage, then its
    filters) drawn; how many, and whether it has a zone."""
    import io

    import numpy as np
    from PIL import Image, ImageDraw

    from .drawing import draw_boxes
    from .filters import DetectionFilter

    info = next((s for s in c.list_streams() if s.stream_id == shot.stream_id), None)
    client = c.client_for(shot.stream_id) if isinstance(c, ShardedClient) else c
    fd = client.detect_image(shot.jpeg)
    dets = np.array([[d.x1, d.y1, d.x2, d.y2, d.score, d.class_id] for d in fd.detections], np.float32).reshape(-1, 6)
    names = {d.class_id: d.class_name for d in fd.detections}
    zone = list(zip(info.zone[0::2], info.zone[1::2], strict=True)) if info is not None else []
    if info is not None:
        dets = DetectionFilter(info.min_score, list(info.classes), zone, sorted(info.class_min_scores.items()))(
            dets, (shot.height, shot.width), names)
    picture = Image.fromarray(draw_boxes(np.asarray(Image.open(io.BytesIO(shot.jpeg)).convert("RGB")), dets, names))
    if zone:
        width = max(2, round((shot.width + shot.height) / 2 * 0.004))
        corners = [(x * shot.width, y * shot.height) for x, y in zone]
        ImageDraw.Draw(picture).line([*corners, corners[0]], fill=ZONE_COLOUR, width=width, joint="curve")
    return picture, len(dets), bool(zone)


def plan_apply(wanted: Sequence[StreamSpec], listed: Sequence[pb.StreamInfo],
               prune: bool, replace: Collection[str] = ()) -> list[tuple[str, str, StreamSpec | None]]:
    """(action, stream id, spec) to make `listed` what `wanted` says, in the order to carry them out: removals first
    (they free --max-streams room), then replacements (URL, max_fps, a filter, blind_after_s or track changed), then
    additions; unchanged cameras are "keep", and cameras the file does not list "unlisted" (or "remove" with
    `prune`). URLs are compared as the server shows them, passwords masked: a changed password alone is not seen,
    hence `replace`, the ids replaced whatever the comparison says."""
    have = {s.stream_id: s for s in listed if s.url != "push://"}  # a pushed stream belongs to its Detect call
    want = {s.stream_id: s for s in wanted}
    steps: list[tuple[str, str, StreamSpec | None]] = []
    for sid in sorted(set(have) - set(want)):
        steps.append(("remove" if prune else "unlisted", sid, None))
    for sid, spec in want.items():
        cur = have.get(sid)
        if cur is None:
            continue
        flat_zone = [c for point in spec.zone for c in point]  # the wire's float32 rounds: compared within 1e-4
        own = cur.blind_after_s if cur.HasField("blind_after_s") else None
        same_blind = own == spec.blind_after_s or (own is not None and spec.blind_after_s is not None
                                                   and abs(own - spec.blind_after_s) < 1e-3)
        same = (same_blind and cur.track == spec.track and cur.url == redact_url(spec.url)
                and abs(cur.max_fps - spec.max_fps) < 1e-3 and abs(cur.min_score - spec.min_score) < 1e-4
                and tuple(cur.classes) == spec.classes
                and _same_scores(dict(cur.class_min_scores), spec.class_min_scores)
                and len(cur.zone) == len(flat_zone) and all(abs(a - b) < 1e-4 for a, b in zip(cur.zone, flat_zone)))
        steps.append(("keep" if same and sid not in replace else "replace", sid, spec))
    steps += [("add", sid, spec) for sid, spec in want.items() if sid not in have]
    order = {"remove": 0, "replace": 1, "add": 2, "keep": 3, "unlisted": 4}
    return sorted(steps, key=lambda step: order[step[0]])


def _same_scores(have: dict[str, float], want: Sequence[tuple[str, float]]) -> bool:
    """Per-class scores equal within the wire's float32 rounding."""
    return set(have) == {n for n, _ in want} and all(abs(have[n] - s) < 1e-4 for n, s in want)


def _check_apply_classes(c: Client | ShardedClient, wanted: Sequence[StreamSpec], file: str) -> None:
    """UsageError, before anything changes (and in a dry run), for a class in `classes` or `class_min_scores` that
    the server's models do not have. The server refuses such a camera too, but only after `apply` has removed the
    running one it replaces: a typo in a class name would take a working camera off the line. Known are the classes
    of every device's engine together, as the server's own check has them (StreamSpec.check_known_classes); a
    server that does not list each engine's (older than EngineInfo.class_names) gives its first device's."""
    named = [(spec.stream_id, n) for spec in wanted for n in (*spec.classes, *(n for n, _ in spec.class_min_scores))]
    if not named:
        return
    known: set[str] = set()
    for client in c.clients if isinstance(c, ShardedClient) else [c]:
        info = client.server_info()
        per_engine = [name for e in info.engines for name in e.class_names]
        known.update(per_engine or info.class_names)
    if not known:  # a server that names no classes: it decides
        return
    for sid, name in named:
        if name not in known:
            raise UsageError(f"{file}: stream {sid}: unknown class {name!r}: the model's classes are "
                             f"{', '.join(sorted(known))} (nothing changed)")


def _add_back(c: Client | ShardedClient, was: pb.StreamInfo) -> bool:
    """Add a camera that `apply` removed to replace it, as it ran, after its replacement was refused (a camera host
    outside --allow-hosts, a file on a server without --allow-files ...): the line keeps its camera. Not possible
    when ListStreams masked its URL (a password: `***`): False, as when the server refuses it now."""
    if "***" in was.url:
        return False
    zone = list(zip(was.zone[0::2], was.zone[1::2], strict=True))
    try:
        c.add_stream(was.stream_id, was.url, was.max_fps, was.min_score, list(was.classes), zone,
                     was.blind_after_s if was.HasField("blind_after_s") else None, was.track,
                     dict(was.class_min_scores))
    except grpc.RpcError:
        return False
    return True


def _apply(c: Client | ShardedClient, args: argparse.Namespace, out: TextIO) -> int:
    try:
        wanted = load_streams_file(args.file)
        for spec in wanted:  # a URL the server would refuse fails the whole file first (and a dry run with it)
            try:
                url_kind(spec.url, allow_files=True)  # files: the server's --allow-files decides
            except InvalidArgumentError as e:
                raise ConfigError(f"{args.file}: stream {spec.stream_id}: {e}") from None
    except ConfigError as e:
        raise UsageError(str(e)) from None
    unknown = sorted(set(args.replace) - {spec.stream_id for spec in wanted})
    if unknown:
        raise UsageError(f"--replace {', '.join(unknown)}: not in {args.file} (nothing changed)")
    _check_apply_classes(c, wanted, args.file)
    done: list[tuple[str, str, str, str]] = []  # action, id, url, result
    listed = c.list_streams()
    running = {s.stream_id: s for s in listed}
    for action, sid, spec in plan_apply(wanted, listed, args.prune, set(args.replace)):
        result = {"keep": "", "unlisted": "kept (--prune removes it)"}.get(action,
                                                                          "dry run" if args.dry_run else "done")
        if result == "done":
            removed = False
            try:
                if action in ("remove", "replace"):
                    c.remove_stream(sid)
                    removed = True
                if spec is not None and action in ("replace", "add"):
                    c.add_stream(sid, spec.url, spec.max_fps, spec.min_score, spec.classes, spec.zone,
                                 spec.blind_after_s, spec.track, dict(spec.class_min_scores))
            except grpc.RpcError as e:
                gone = ""
                if removed and action == "replace":
                    back = _add_back(c, running[sid])
                    gone = " (the running one added back)" if back else " (removed, not added back)"
                result = f"failed: {e.code().name}{gone}"
                print(f"yolov12-ctl: {action} {sid}{gone}: {_one_line(e, _servers(args), args)}", file=sys.stderr,
                      flush=True)
        done.append((action, sid, redact_url(spec.url) if spec is not None else "", result))
    if args.json:
        for action, sid, url, result in done:
            out.write(json.dumps({"action": action, "stream_id": sid, "url": url, "result": result}) + "\n")
    else:
        _table([("ACTION", "STREAM", "URL", "RESULT"), *((a, sid, url or "-", r) for a, sid, url, r in done)], out)
        n = {a: sum(1 for step in done if step[0] == a and not step[3].startswith("failed"))
             for a in ("add", "replace", "remove", "keep", "unlisted")}
        verbs = ("to add", "to replace", "to remove") if args.dry_run else ("added", "replaced", "removed")
        failed = sum(1 for step in done if step[3].startswith("failed"))
        out.write(f"{n['add']} {verbs[0]}, {n['replace']} {verbs[1]}, {n['remove']} {verbs[2]}, {n['keep']} unchanged, "
                  f"{n['unlisted']} not in the file" + (" (dry run: nothing changed)" if args.dry_run else "")
                  + (f"; {failed} failed (said above)" if failed else "") + "\n")
    return 1 if any(step[3].startswith("failed") for step in done) else 0


def _info(clients: Sequence[tuple[str, Client]], as_json: bool, out: TextIO) -> int:
    for address, c in clients:
        info = c.server_info()
        if as_json:
            out.write(json.dumps({"server": address, **message_dict(info)}) + "\n")
            continue
        out.write(f"{address}: yolov12-serve {info.version}, SLO {info.slo_ms:g} ms, max batch {info.max_batch}, "
                  f"up to {info.max_streams} streams, input {info.input_height}x{info.input_width}\n")
        apart = len({tuple(e.class_names) for e in info.engines if e.class_names}) > 1  # engines of other classes
        if not apart:
            out.write(f"  classes: {', '.join(info.class_names)}\n")
        for e in info.engines:
            out.write(f"  engine {e.path} on {e.device}: {e.precision}, input {e.input_height}x{e.input_width}"
                      f"{' (dynamic)' if e.dynamic_hw else ''}, batch {e.batch_min}..{e.batch_max}, "
                      f"{e.instances} instances, model {e.model_version}\n")
            if apart:
                out.write(f"    classes: {', '.join(e.class_names)}\n")
        for d in info.device_status:
            where = f", process {d.pid}" if d.pid else ""
            out.write(f"  device {d.device}: {d.state}{where}{': ' + d.error if d.error else ''}\n")
    return 0


def _health(clients: Sequence[tuple[str, Client]], args: argparse.Namespace, out: TextIO) -> int:
    """A line per server on stdout (its status, for scripts and probes); a server not reached also gets the reason
    and what to check on stderr, as every refused call does: a bare UNAVAILABLE said nothing of a server with TLS
    asked without --tls-ca, or of a typo in --server."""
    serving, as_json = True, args.json
    for address, c in clients:
        try:
            status = c.health()
        except grpc.RpcError as e:
            status = e.code().name
            print(f"yolov12-ctl: {address}: {_one_line(e, [address], args)}", file=sys.stderr, flush=True)
        serving &= status == "SERVING"
        out.write((json.dumps({"server": address, "status": status}) if as_json else f"{address}: {status}") + "\n")
    return 0 if serving else 1


def _engine_paths(paths: Sequence[str]) -> list[str]:
    """The engine files as the server should read them: absolute. A relative path was read from the server's working
    directory (not this shell's) and shown so by `info`; one that exists here is made absolute (a server on this
    machine), one that does not is a usage error."""
    absolute = []
    for path in paths:
        if not os.path.isabs(path):
            if not os.path.exists(path):
                raise UsageError(f"reload {path}: give the engine file's absolute path on the server's machine (a "
                                 "relative one would be read from the server's working directory)")
            path = os.path.abspath(path)
        absolute.append(path)
    return absolute


def _reload(clients: Sequence[tuple[str, Client]], args: argparse.Namespace, out: TextIO) -> int:
    paths = _engine_paths(args.engines)
    for address, c in clients:
        engines = c.reload_engines(paths, timeout=max(args.timeout, 300.0))
        for e in engines:
            out.write((json.dumps({"server": address, **message_dict(e)}) if args.json
                       else f"{address}: {e.device} runs {e.path} (model {e.model_version})") + "\n")
    return 0


def run(args: argparse.Namespace, out: TextIO) -> int:
    """Carry out one parsed command against the server(s); returns the exit status."""
    servers = _servers(args)
    kwargs = _client_kwargs(args)
    routed = ShardedClient(servers, **kwargs) if len(servers) > 1 else None
    clients = routed.clients if routed is not None else [Client(servers[0], **kwargs)]
    each = list(zip(servers, clients, strict=True))
    c: Client | ShardedClient = routed if routed is not None else clients[0]
    commands: dict[str, Callable[[], int]] = {
        "streams": lambda: _print_streams(c.list_streams(), args.json, out),
        "add": lambda: _print_streams([c.add_stream(args.stream_id, args.url, args.max_fps, args.min_score,
                                                    args.classes, args.zone, args.blind_after_s, args.track,
                                                    dict(args.class_min_scores))],
                                               args.json, out),
        "remove": lambda: _remove(c, args, out),
        "apply": lambda: _apply(c, args, out),
        "watch": lambda: _watch(c, args, out),
        "detect": lambda: _detect(clients[0], args, out),
        "snapshot": lambda: _snapshot(c, args, out),
        "info": lambda: _info(each, args.json, out),
        "health": lambda: _health(each, args, out),
        "reload": lambda: _reload(each, args, out),
    }
    try:
        return commands[args.command]()
    finally:
        for client in clients:
            client.close()


def _answered_by_server(e: grpc.RpcError) -> bool:
    """Whether the error is the server's own answer (its trailers say so), not gRPC's failing to reach it."""
    try:
        trailers = e.trailing_metadata() or ()
    except AttributeError:  # an RpcError that is not a call
        return False
    return any((key, value) in ANSWERED_BY_SERVER for key, value in trailers)


def _hint(code: grpc.StatusCode, details: str, args: argparse.Namespace | None) -> str | None:
    """What to do about a refused call: HINTS', or, where the command line shows the usual hint does not fit (a
    token was given; TLS is on), one that names what to check."""
    if args is None:
        return HINTS.get(code)
    if code == grpc.StatusCode.UNAUTHENTICATED and (args.token_file or os.environ.get("YOLOV12_TOKEN")):
        return TOKEN_REFUSED_HINT  # not "the server wants a token": one was sent, and refused
    if code == grpc.StatusCode.UNAVAILABLE and args.tls_ca:
        if "CERTIFICATE_VERIFY_FAILED" in details:
            return CA_REFUSED_HINT
        if "Hostname Verification" in details:
            return NAME_REFUSED_HINT
        if "WRONG_VERSION_NUMBER" in details:  # a TLS handshake answered in plaintext
            return PLAINTEXT_SERVER_HINT
        if "Connection refused" in details:  # nothing listens there: no TLS question yet
            return "is the server running there? (--server, or YOLOV12_SERVER)"
        # a handshake the server ends for want of a good client certificate reads as "Socket closed" here
        return MUTUAL_TLS_HINT.format("without a certificate: give --cert and --key" if args.cert is None else
                                      "whose --cert that CA did not sign")
    return HINTS.get(code)


def _one_line(e: grpc.RpcError, servers: list[str], args: argparse.Namespace | None = None) -> str:
    code = e.code()
    details = (e.details() or "").splitlines()[0] if e.details() else ""
    hint = _hint(code, details, args)
    if code == grpc.StatusCode.UNAVAILABLE and (_answered_by_server(e) or details.startswith(SERVER_SAYS_UNAVAILABLE)):
        hint = None  # the server was reached and said why (a camera sent no frame, starting, shutting down): its words
    elif code == grpc.StatusCode.UNAVAILABLE:
        details = f"cannot reach {', '.join(servers)}" + (f" ({details})" if details else "")
    elif code == grpc.StatusCode.PERMISSION_DENIED and " role" not in details:
        hint = None  # a camera host the server refuses, not a token's role: the message says what to change
    return f"{code.name}: {details}" + (f"; {hint}" if hint else "")


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    """Entry point of `yolov12-ctl`; returns the exit status."""
    args = build_parser().parse_args(argv)
    out = out or sys.stdout
    try:
        return run(args, out)
    except UsageError as e:
        sys.stderr.write(f"yolov12-ctl: {e}\n")
        return 2
    except UnicodeEncodeError as e:  # bytes no UTF-8 text holds (a mistyped id, a Latin-1 terminal): not sendable
        text = e.object.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")  # the bytes typed
        sys.stderr.write(f"yolov12-ctl: '{text}' is not UTF-8 text, which the server takes: type it again in "
                         "a UTF-8 terminal (ids: printable ASCII)\n")
        return 2
    except grpc.RpcError as e:
        sys.stderr.write(f"yolov12-ctl: {_one_line(e, _servers(args), args)}\n")
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # piped into head: the reader has all it wanted
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
