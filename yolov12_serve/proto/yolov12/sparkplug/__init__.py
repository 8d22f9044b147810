"""Package `yolov12.sparkplug`: the Sparkplug B payload, generated from sparkplug_b.proto by scripts/gen_protos
(do not edit)."""
