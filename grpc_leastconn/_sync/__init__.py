"""The sync front end: a ``grpc.Channel`` over the shared core, driven by threads."""
