"""What the tests use beyond the public API: the declared seams, and the pure core.

Integration tests build channels through each front end's ``open_channel``
with ``Seams`` (resolver, clock, observer); unit tests drive the pure core's
pieces directly. Every such name is imported here, once, so the rest of the
suite depends on the package's public surface and on this list only.
"""

from grpc_leastconn._aio.channel import open_channel as open_aio_channel
from grpc_leastconn._aio.finished import FinishedCall
from grpc_leastconn._core import (
    backend,
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
Backend = backend.Backend
Backoff = backoff.Backoff
Balancer = balancer.Balancer
Health = backend.Health
LeastConnPicker = picker.LeastConnPicker
MaintenancePlan = maintenance.MaintenancePlan
Node = picker.Node
Observer = seams.Observer
Resolution = resolver.Resolution
ResolutionError = resolver.ResolutionError
ResolutionSchedule = backoff.ResolutionSchedule
Resolver = resolver.Resolver
Seams = seams.Seams
Settings = settings.Settings
Step = maintenance.Step
TIE_BREAKS = picker.TIE_BREAKS
WatchEnd = health.WatchEnd
WatchPolicy = health.WatchPolicy
channel_options = backend_options.channel_options
make_balancer = rules.make_balancer
make_settings = settings.make_settings
may_repick = rules.may_repick
never_sent = errors.never_sent
no_backend = rules.no_backend
parse_target = target.parse_target
resolve_again = maintenance.resolve_again
resolve_initial = maintenance.resolve_initial

__all__ = [
    "TIE_BREAKS",
    "Address",
    "Backend",
    "Backoff",
    "Balancer",
    "FailedCall",
    "FinishedCall",
    "Health",
    "LeastConnPicker",
    "MaintenancePlan",
    "Node",
    "Observer",
    "Resolution",
    "ResolutionError",
    "ResolutionSchedule",
    "Resolver",
    "Seams",
    "Settings",
    "Step",
    "WatchEnd",
    "WatchPolicy",
    "channel_options",
    "make_balancer",
    "make_settings",
    "may_repick",
    "never_sent",
    "no_backend",
    "open_aio_channel",
    "open_channel",
    "parse_target",
    "resolve_again",
    "resolve_initial",
    "rules",
]
