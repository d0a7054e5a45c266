"""ENGINE onnxruntime: a graph exported by `deep-detection export --format onnx`, run by ONNX Runtime.

session.py chooses the execution provider and validates the options; engine.py
feeds the graph (dd.worker.engines.exported) and decodes its outputs.
"""

from dd.worker.engines.onnxruntime.engine import OnnxRuntimeMaskRCNN

__all__ = ["OnnxRuntimeMaskRCNN"]
