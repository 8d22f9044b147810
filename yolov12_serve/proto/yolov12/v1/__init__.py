"""Package `yolov12.v1`: generated from detector.proto by scripts/gen_protos (do not edit)."""
