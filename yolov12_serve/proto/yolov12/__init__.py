"""Package `yolov12` of the API protos."""
