"""Conversions between the core's records and the API's protobuf messages (the only module that builds them)."""

from __future__ import annotations

import time

from .core import ServerInfoView
from .frames import FrameResult
from .proto import detector_pb2 as pb
from .stream import StreamView

__all__ = ["frame_detections", "server_info", "stream_info"]


def stream_info(view: StreamView) -> pb.StreamInfo:
    """StreamView -> StreamInfo."""
    return pb.StreamInfo(
        stream_id=view.stream_id, url=view.url, state=int(view.state), device=view.device, fps=view.fps,
        last_error=view.last_error, frames_processed=view.frames_processed, frames_dropped=view.frames_dropped,
        reconnects=view.reconnects, latency_p50_ms=view.latency_p50_ms, latency_p99_ms=view.latency_p99_ms,
        width=view.width, height=view.height, max_fps=view.max_fps, min_score=view.min_score,
        classes=view.classes, zone=[c for point in view.zone for c in point], picture_problem=view.picture_problem,
        blind_after_s=view.blind_after_s, track=view.track, objects=view.objects,
        last_error_age_s=view.last_error_age_s, class_min_scores=dict(view.class_min_scores), decoder=view.decoder,
        failing_for_s=view.failing_for_s)


def frame_detections(result: FrameResult, names: dict[int, str], stream_id: str | None = None) -> pb.FrameDetections:
    """FrameResult -> FrameDetections (boxes already in source pixels); `stream_id` overrides the internal id."""
    dets = [pb.Detection(x1=float(d[0]), y1=float(d[1]), x2=float(d[2]), y2=float(d[3]), score=float(d[4]),
                         class_id=int(d[5]), class_name=names.get(int(d[5]), str(int(d[5]))))
            for d in result.detections.tolist()]
    if result.track_ids is not None:
        for det, track_id in zip(dets, result.track_ids.tolist(), strict=True):
            det.track_id = track_id
    return pb.FrameDetections(
        stream_id=result.stream_id if stream_id is None else stream_id, frame_id=result.frame_id, detections=dets,
        width=result.src_hw[1], height=result.src_hw[0],
        capture_time_us=result.capture_time_us or time.time_ns() // 1000,
        latency_ms=result.latency_s * 1000.0, device=result.device, error=result.error or "",
        model_version=result.model_version)


def server_info(view: ServerInfoView) -> pb.ServerInfo:
    """ServerInfoView -> ServerInfo."""
    engines = [pb.EngineInfo(path=path, device=device, input_height=info.imgsz[0], input_width=info.imgsz[1],
                             stride=info.stride, batch_min=info.batch[0], batch_max=info.batch[1],
                             dynamic_hw=info.dynamic_hw, precision=info.precision, variant=info.variant,
                             scale=info.scale, instances=instances, conf=info.conf, iou=info.iou,
                             max_det=info.max_det, model_version=version,
                             class_names=[info.names.get(i, str(i)) for i in range(max(info.names, default=-1) + 1)])
               for path, device, info, instances, version in view.engines]
    status = [pb.DeviceStatus(device=d.device, healthy=d.healthy, state=d.state, error=d.error,
                              model_version=d.model_version, pid=d.pid) for d in view.device_status]
    return pb.ServerInfo(version=view.version, engines=engines, devices=view.devices, class_names=view.class_names,
                         input_height=view.input_hw[0], input_width=view.input_hw[1], slo_ms=view.slo_ms,
                         max_batch=view.max_batch, max_streams=view.max_streams, process_late=view.process_late,
                         device_status=status)
