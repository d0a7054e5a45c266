"""ENGINE tensorrt: a serialized TensorRT engine (.engine / .plan) built from a `--format tensorrt-onnx` export.

runtime.py loads the engine and runs it through TensorRT's Python API (imported lazily);
bindings.py plans its tensors (pure logic, tested without TensorRT); compat.py names the
TensorRT version and GPU an engine was built for when they do not match this machine;
engine.py feeds it and decodes the sample layout (dd.worker.engines.exported).
"""

from dd.worker.engines.tensorrt.engine import TensorRTMaskRCNN

__all__ = ["TensorRTMaskRCNN"]
