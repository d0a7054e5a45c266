"""The gRPC frontend: validation, decoding into shared memory, dispatch to workers. Never imports an engine."""
