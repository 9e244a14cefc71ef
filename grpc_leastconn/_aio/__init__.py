"""The asyncio front end: a ``grpc.aio.Channel`` over the shared core, driven by tasks."""
