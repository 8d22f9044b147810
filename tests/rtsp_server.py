"""A real RTSP server for the tests (GStreamer's gst-rtsp-server); run with Debian's /usr/bin/python3 (gi lives there).

    /usr/bin/python3 tests/rtsp_server.py --port 8554 --mount cam0=frames0.rgb:640x360 --mount cam1=...:800x600

Each mount loops the raw RGB24 frames of its file as a live H.264 stream at --fps (appsrc ! x264enc
tune=zerolatency), shared by all clients of the mount. A mount may list more files of other sizes
(cam=a.rgb:640x360,b.rgb:1280x720): it starts with the first. A --clip mount plays an H.264 .mp4 instead, with
no encoder (benchmarks: the test server then takes almost no CPU), each client its own session from the
clip's start: cameras connected one after another are out of phase, as real cameras are (the clients of
a shared mount all get every frame at the same instant). --udp-only mounts refuse RTSP over TCP (461
Unsupported Transport), as some cameras do. Prints "ready PORT" once listening. Commands on stdin, one per line:
"pause NAME" (stop sending frames but keep connections open: a stalled camera),
"resume NAME", "size NAME WxH" (send that file's frames from now on, same sessions: new SPS, as when an
operator changes a camera's resolution), "corrupt NAME N" (the next N frames go out with their slice headers
damaged, as after a lost packet: the decoder rejects them), "quit". --auth USER:PASSWORD asks every client for
those credentials (RTSP Basic authentication; others get 401 Unauthorized), as cameras do.

    /usr/bin/python3 tests/rtsp_server.py --port 8554 --clip cam=clip.mp4
"""

from __future__ import annotations

import argparse
import sys
import threading

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstRtsp", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtsp, GstRtspServer  # noqa: E402


class LoopingMount:
    """A shared live mount that pushes the next frame of its file into every prepared appsrc at `fps`."""

    def __init__(self, name: str, files: list[tuple[str, int, int]], fps: int) -> None:
        self.name, self.fps = name, fps
        self.sizes: dict[tuple[int, int], list[bytes]] = {}
        for path, width, height in files:
            with open(path, "rb") as f:
                data = f.read()
            size = width * height * 3
            if not data or len(data) % size:
                raise SystemExit(f"{path}: {len(data)} bytes is not a whole number of {width}x{height} RGB frames")
            self.sizes[(width, height)] = [data[i:i + size] for i in range(0, len(data), size)]
        width, height = files[0][1:]
        self.frames = self.sizes[(width, height)]
        self.caps = self._caps(width, height)  # the size sent now: a media made after a resize starts with it
        self.corrupt = 0  # frames still to send with damaged slice headers
        self._chaining = False
        self.paused = False
        self.appsrcs: list[Gst.Element] = []
        self.index = 0
        self.factory = GstRtspServer.RTSPMediaFactory()
        self.factory.set_launch(
            f"( appsrc name=src is-live=true format=time do-timestamp=true "
            f"caps=video/x-raw,format=RGB,width={width},height={height},framerate={fps}/1 "
            "! videoconvert ! video/x-raw,format=I420 "
            f"! x264enc tune=zerolatency speed-preset=ultrafast key-int-max={fps} bitrate=1500 "
            "! video/x-h264,profile=baseline ! rtph264pay name=pay0 pt=96 config-interval=1 )")
        self.factory.set_shared(True)
        self.factory.connect("media-configure", self._configure)
        GLib.timeout_add(int(1000 / fps), self._tick)

    def _configure(self, factory, media) -> None:
        src = media.get_element().get_by_name_recurse_up("src")
        src.set_property("caps", self.caps)
        self.appsrcs.append(src)
        media.connect("unprepared", lambda m: self.appsrcs.remove(src) if src in self.appsrcs else None)
        pay = media.get_element().get_by_name_recurse_up("pay0")
        pay.get_static_pad("sink").add_probe(Gst.PadProbeType.BUFFER, self._damage)

    def _damage(self, pad, info):
        """While `corrupt` frames are due: the encoded frame (AVC, 4-byte NAL lengths) is sent instead with each
        slice's first_mb_in_slice out of range, which the decoder rejects; the original is dropped."""
        buf = info.get_buffer()
        if self.corrupt <= 0 or self._chaining:  # (the damaged copy itself passes this probe too)
            return Gst.PadProbeReturn.OK
        self.corrupt -= 1
        data, i = bytearray(buf.extract_dup(0, buf.get_size())), 0
        while i + 9 <= len(data):
            n = int.from_bytes(data[i:i + 4], "big")
            if data[i + 4] & 0x1F in (1, 5) and n > 5:  # a slice: the bytes after its header byte
                data[i + 5:i + 9] = b"\x00\x01\x00\x01"
            i += 4 + n
        damaged = Gst.Buffer.new_wrapped(bytes(data))
        damaged.pts, damaged.dts, damaged.duration = buf.pts, buf.dts, buf.duration
        self._chaining = True
        try:
            pad.chain(damaged)
        finally:
            self._chaining = False
        return Gst.PadProbeReturn.DROP

    def resize(self, width: int, height: int) -> None:
        """Send the frames of that size from now on, on the same sessions (the encoder starts a new SPS)."""
        self.frames = self.sizes[(width, height)]
        self.caps = self._caps(width, height)
        for src in self.appsrcs:
            src.set_property("caps", self.caps)

    def _caps(self, width: int, height: int) -> Gst.Caps:
        return Gst.Caps.from_string(f"video/x-raw,format=RGB,width={width},height={height},framerate={self.fps}/1")

    def _tick(self) -> bool:
        if self.paused or not self.appsrcs:
            return True
        frame = self.frames[self.index % len(self.frames)]
        self.index += 1
        for src in list(self.appsrcs):  # appsrc stamps each buffer with its own pipeline's running time
            buf = Gst.Buffer.new_wrapped(frame)
            buf.duration = Gst.SECOND // self.fps
            src.emit("push-buffer", buf)
        return True


def clip_factory(path: str) -> GstRtspServer.RTSPMediaFactory:
    """A mount that re-packetises an H.264 .mp4 for each client (no encoding; paced by the clip's timestamps)."""
    factory = GstRtspServer.RTSPMediaFactory()
    factory.set_launch(f'( filesrc location="{path}" ! qtdemux ! h264parse ! rtph264pay name=pay0 pt=96 '
                       "config-interval=1 )")
    factory.set_shared(False)
    return factory


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--fps", type=int, default=25)
    p.add_argument("--mount", action="append", default=[], help="NAME=FILE.rgb:WxH[,FILE.rgb:WxH...]")
    p.add_argument("--clip", action="append", default=[], help="NAME=FILE.mp4 (H.264)")
    p.add_argument("--udp-only", action="store_true", help="refuse RTSP over TCP (461), as some cameras do")
    p.add_argument("--auth", metavar="USER:PASSWORD", help="RTSP Basic authentication for every mount")
    args = p.parse_args()
    if not args.mount and not args.clip:
        p.error("give at least one --mount or --clip")
    Gst.init(None)
    server = GstRtspServer.RTSPServer()
    server.set_address("127.0.0.1")
    server.set_service(str(args.port))
    mounts: dict[str, LoopingMount] = {}
    for spec in args.mount:
        name, rest = spec.split("=", 1)
        files = []
        for part in rest.split(","):
            path, size = part.rsplit(":", 1)
            w, h = (int(v) for v in size.split("x"))
            files.append((path, w, h))
        mounts[name] = LoopingMount(name, files, args.fps)
        if args.udp_only:
            mounts[name].factory.set_protocols(GstRtsp.RTSPLowerTrans.UDP)
            # a media of each client's own: shared, the media that the refused TCP session prepared is still being
            # torn down when the client comes back over UDP at once, and that DESCRIBE is answered 503 (1 in 4 runs)
            mounts[name].factory.set_shared(False)
        server.get_mount_points().add_factory(f"/{name}", mounts[name].factory)
    for spec in args.clip:
        name, path = spec.split("=", 1)
        if '"' in path or "\\" in path:
            p.error(f"--clip {spec!r}: the path may not contain a double quote or backslash (gst-launch syntax)")
        server.get_mount_points().add_factory(f"/{name}", clip_factory(path))
    if args.auth:
        user, password = args.auth.split(":", 1)
        auth, token = GstRtspServer.RTSPAuth(), GstRtspServer.RTSPToken()
        token.set_string(GstRtspServer.RTSP_TOKEN_MEDIA_FACTORY_ROLE, "viewer")
        auth.add_basic(GstRtspServer.RTSPAuth.make_basic(user, password), token)
        server.set_auth(auth)
        role = Gst.Structure.new_from_string("viewer, media.factory.access=(boolean)true, "
                                             "media.factory.construct=(boolean)true")
        for factory in [m.factory for m in mounts.values()]:
            factory.add_role_from_structure(role)
    if server.attach(None) == 0:
        raise SystemExit(f"cannot listen on port {args.port}")
    loop = GLib.MainLoop()

    def commands() -> None:
        for line in sys.stdin:
            cmd, _, rest = line.strip().partition(" ")
            name, _, arg = rest.partition(" ")
            if cmd == "quit":
                break
            if name in mounts and cmd in ("pause", "resume"):
                GLib.idle_add(setattr, mounts[name], "paused", cmd == "pause")
            elif name in mounts and cmd == "size":
                GLib.idle_add(mounts[name].resize, *(int(v) for v in arg.split("x")))
            elif name in mounts and cmd == "corrupt":
                GLib.idle_add(setattr, mounts[name], "corrupt", int(arg))
        GLib.idle_add(loop.quit)

    threading.Thread(target=commands, daemon=True).start()
    print(f"ready {args.port}", flush=True)
    loop.run()


if __name__ == "__main__":
    main()
