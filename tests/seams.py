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
    failures,
    foundation,
    health,
    maintenance,
    outlier,
    picker,
    resolver,
    rules,
    seams,
    settings,
    slowstart,
    stepped,
    target,
    weighted,
    weights,
)
from grpc_leastconn._sync.channel import open_channel
from grpc_leastconn._sync.core import MANY_WATCHED_BACKENDS
from grpc_leastconn._sync.failed import FailedCall

Address = target.Address
Backend = backend.Backend
BackendState = backend.BackendState
Backoff = backoff.Backoff
Balancer = balancer.Balancer
CALLER_CODES = failures.CALLER_CODES
CAP = failures.CAP
DECAY_S = failures.DECAY_S
DEFAULT_FAILURE_CODES = failures.DEFAULT_FAILURE_CODES
FORGET = failures.FORGET
FailurePenalty = failures.FailurePenalty
FailurePercentageEjection = outlier.FailurePercentageEjection
Foundation = foundation.Foundation
HEALTH_WATCH = health.HEALTH_WATCH
Health = backend.Health
LeastConnPicker = picker.LeastConnPicker
MaintenancePlan = maintenance.MaintenancePlan
MIN_CALL_COST = weights.MIN_CALL_COST
Node = picker.Node
Observer = seams.Observer
OutlierDetection = outlier.OutlierDetection
OutlierDetector = outlier.OutlierDetector
REFRESH_S = failures.REFRESH_S
Resolution = resolver.Resolution
ResolutionError = resolver.ResolutionError
ResolutionSchedule = backoff.ResolutionSchedule
Resolver = resolver.Resolver
Seams = seams.Seams
Settings = settings.Settings
Step = maintenance.Step
SteppedPicker = stepped.SteppedPicker
SUCCESS_FACTOR = failures.SUCCESS_FACTOR
MAX_DECAY_S = failures.MAX_DECAY_S
STREAK_DOUBLING = failures.STREAK_DOUBLING
SuccessRateEjection = outlier.SuccessRateEjection
TIE_BREAKS = picker.TIE_BREAKS
UNIT = weighted.UNIT
WARN_AT = failures.WARN_AT
WatchEnd = health.WatchEnd
WatchPolicy = health.WatchPolicy
WeightedPicker = weighted.WeightedPicker
Weights = weights.Weights
channel_options = backend_options.channel_options
check_call_costs = weights.check_call_costs
check_failure_codes = failures.check_failure_codes
check_slow_start = slowstart.check_slow_start
check_weights = weights.check_weights
decayed_penalty = failures.decayed_penalty
make_balancer = rules.make_balancer
make_settings = settings.make_settings
may_repick = rules.may_repick
never_sent = errors.never_sent
no_backend = rules.no_backend
parse_target = target.parse_target
resolve_again = maintenance.resolve_again
resolve_initial = maintenance.resolve_initial

__all__ = [
    "CALLER_CODES",
    "CAP",
    "DECAY_S",
    "DEFAULT_FAILURE_CODES",
    "FORGET",
    "HEALTH_WATCH",
    "MANY_WATCHED_BACKENDS",
    "MAX_DECAY_S",
    "MIN_CALL_COST",
    "REFRESH_S",
    "STREAK_DOUBLING",
    "SUCCESS_FACTOR",
    "TIE_BREAKS",
    "UNIT",
    "WARN_AT",
    "Address",
    "Backend",
    "BackendState",
    "Backoff",
    "Balancer",
    "FailedCall",
    "FailurePenalty",
    "FailurePercentageEjection",
    "FinishedCall",
    "Foundation",
    "Health",
    "LeastConnPicker",
    "MaintenancePlan",
    "Node",
    "Observer",
    "OutlierDetection",
    "OutlierDetector",
    "Resolution",
    "ResolutionError",
    "ResolutionSchedule",
    "Resolver",
    "Seams",
    "Settings",
    "Step",
    "SteppedPicker",
    "SuccessRateEjection",
    "WatchEnd",
    "WatchPolicy",
    "WeightedPicker",
    "Weights",
    "channel_options",
    "check_call_costs",
    "check_failure_codes",
    "check_slow_start",
    "check_weights",
    "decayed_penalty",
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
