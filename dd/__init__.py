"""deep-detection: a gRPC server for instance-segmentation models."""
