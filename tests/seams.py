"""What the tests use beyond the public API: the declared seams, and the pure core.

Integration tests build channels through each front end's ``open_channel``
with ``Seams`` (resolver, clock, observer); unit tests drive the pure core's
pieces directly. Every such name is imported here, once, so the rest of the
suite depends on the package's public surface and on this list only.
"""

from grpc_leastconn._aio.channel import open_channel as open_aio_channel
from grpc_leastconn._aio.finished import FinishedCall
from grpc_leastconn._core import (
    backend_options,
    backoff,
    balancer,
    errors,
    health,
    maintenance,
    picker,
    resolver,
    rules,
    seams,
    settings,
    target,
)
from grpc_leastconn._sync.channel import open_channel
from grpc_leastconn._sync.failed import FailedCall

Address = target.Address
Backoff = backoff.Backoff
Balancer = balancer.Balancer
LeastConnPicker = picker.LeastConnPicker
MaintenancePlan = maintenance.MaintenancePlan
Node = picker.Node
Observer = seams.Observer
Resolution = resolver.Resolution
ResolutionSchedule = backoff.ResolutionSchedule
Resolver = resolver.Resolver
Seams = seams.Seams
TIE_BREAKS = picker.TIE_BREAKS
WatchPolicy = health.WatchPolicy
channel_options = backend_options.channel_options
make_settings = settings.make_settings
never_sent = errors.never_sent
parse_target = target.parse_target

__all__ = [
    "TIE_BREAKS",
    "Address",
    "Backoff",
    "Balancer",
    "FailedCall",
    "FinishedCall",
    "LeastConnPicker",
    "MaintenancePlan",
    "Node",
    "Observer",
    "Resolution",
    "ResolutionSchedule",
    "Resolver",
    "Seams",
    "WatchPolicy",
    "channel_options",
    "make_settings",
    "never_sent",
    "open_aio_channel",
    "open_channel",
    "parse_target",
    "rules",
]
