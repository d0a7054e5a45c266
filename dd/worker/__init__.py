"""Worker processes: one engine each, dynamic batching, results encoded and serialized here."""
