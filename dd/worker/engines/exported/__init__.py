"""What every engine that runs an exported graph shares: the input canvas and the output decoding.

The graph (dd.models.graph_layout) starts at the normalised, padded tensor and ends at
detections with 28 x 28 mask probabilities: the resize before it and the mask paste after it
stay here, in the source model's rules, so the onnxruntime and tensorrt engines answer alike.
"""
