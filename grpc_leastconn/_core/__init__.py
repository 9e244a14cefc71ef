"""The core both front ends share: pure, with no threads, no asyncio and no grpc calls.

target (what the user asked for) -> resolver (addresses) -> balancer (every
backend's state, one event at a time) -> picker (the least-loaded eligible
backend). Around them: settings, backend channel options, backoff and the
maintenance plan, the health-watch policy, and the rules every RPC follows.
The front ends (``_sync``, ``_aio``) serialize events into it and carry out
what it decides.
"""
