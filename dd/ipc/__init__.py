"""What a frontend and a worker share: the shared-memory ring, the control messages, the socket paths."""
