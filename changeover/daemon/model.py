"""The deploy's typed model: slot and deployment states, step kinds, trigger reasons, and the one
table of allowed transitions. `state.State` is the only writer of a transition and checks it here.

Deployment states (`kind = deploy`)::

    running ──prepare ok──▶ prepared ──switch──▶ observing ──window passes / promote──▶ succeeded
       │                       │                    │
       │ a step fails,         │ abort              │ trigger, manual rollback, a check after the
       │ abort, restart        ▼                    ▼ switch fails
       └────────────────▶ failed / aborted     rolling_back ──proxy back on the old slot──▶ rolled_back
                                                    └── no warm standby ──▶ failed

A `rollback` deployment runs `running ──▶ observing ──▶ succeeded` (a cold rollback is verified
before its switch and observed after it, like a deploy) or ends `failed` with the old release live.

Steps and what undoes them (the pipeline unwinds the steps that ran, newest first):

    pre_checks, verify_*, session, note ....... nothing to undo (they only read)
    build ..................................... remove the release directory it exported (daemon/build_steps.py)
    migrate ................................... kept: expand migrations are safe for the old code
    retire .................................... nothing (the old standby was given up on purpose)
    start ..................................... clean up the slot it started
    switch .................................... switch back to the slot that was live
    observe ................................... nothing
"""

from __future__ import annotations

from enum import StrEnum


class SlotState(StrEnum):
    EMPTY = "empty"
    STARTING = "starting"
    LIVE = "live"
    STANDBY = "standby"
    STOPPING = "stopping"


class DeploymentState(StrEnum):
    RUNNING = "running"            # preparing: nothing users see has changed
    PREPARED = "prepared"          # the new release runs and passed private verification; not switched
    OBSERVING = "observing"        # switched: verification through the proxy, then the window
    ROLLING_BACK = "rolling_back"  # a rollback of this deployment began: it is always finished
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    ABORTED = "aborted"
    ROLLED_BACK = "rolled_back"

    @property
    def finished(self) -> bool:
        return self in FINISHED

    @property
    def switched(self) -> bool:
        """Whether users may see the new release in this state."""
        return self in (DeploymentState.OBSERVING, DeploymentState.ROLLING_BACK)


FINISHED = frozenset({DeploymentState.SUCCEEDED, DeploymentState.FAILED, DeploymentState.ABORTED,
                      DeploymentState.ROLLED_BACK})
IN_FLIGHT = (DeploymentState.RUNNING, DeploymentState.PREPARED, DeploymentState.OBSERVING,
             DeploymentState.ROLLING_BACK)


class DeploymentKind(StrEnum):
    DEPLOY = "deploy"
    ROLLBACK = "rollback"
    DRILL = "drill"                    # `changeover drill` (daemon/drill.py): rehearses, changes nothing users see


class StepKind(StrEnum):
    PRE_CHECKS = "pre_checks"
    BUILD = "build"                    # export the release (--git/--archive) and run [app] build
    MIGRATE = "migrate"
    RETIRE = "retire"                  # retire the old standby to make room
    START = "start"                    # start the release in the idle slot
    VERIFY_PRIVATE = "verify_private"  # version, smoke, flows against the idle slot directly
    OLD_ON_NEW = "old_on_new"          # the live release's smoke tests on the new schema
    SESSION = "session"                # sign in through the proxy before the switch
    SWITCH = "switch"                  # the proxy sends new requests to the new slot
    VERIFY_PUBLIC = "verify_public"    # session continuity, smoke, flows through the proxy
    OBSERVE = "observe"
    SWITCH_BACK = "switch_back"        # undo of SWITCH: a rollback or a failure after the switch
    CLEANUP = "cleanup"                # undo of START
    SCHEMA_ROLLBACK = "schema_rollback"
    NOTE = "note"                      # considered and skipped
    DRILL = "drill"                    # a rollback path rehearsed on the drill copy (undone by its cleanup)


# Trigger reasons of an automatic rollback, as the observer names them (monitor.triggers).
class TriggerReason(StrEnum):
    CONSECUTIVE = "consecutive_failures"
    ERROR_RATE = "error_rate"
    LATENCY = "latency"
    DATABASE = "database"
    CRITICAL = "critical_service"
    CRASH_LOOP = "crash_loop"
    ROUTE = "route"
    MANUAL = "manual"
    CHECK = "check"                    # a verification through the proxy failed after the switch


_D = DeploymentState
DEPLOYMENT_TRANSITIONS: dict[DeploymentState, frozenset[DeploymentState]] = {
    _D.RUNNING: frozenset({_D.PREPARED, _D.OBSERVING, _D.FAILED, _D.ABORTED, _D.ROLLING_BACK, _D.SUCCEEDED}),
    _D.PREPARED: frozenset({_D.OBSERVING, _D.FAILED, _D.ABORTED, _D.ROLLING_BACK}),
    _D.OBSERVING: frozenset({_D.SUCCEEDED, _D.ROLLING_BACK, _D.FAILED}),
    _D.ROLLING_BACK: frozenset({_D.ROLLED_BACK, _D.FAILED}),
    _D.SUCCEEDED: frozenset(),
    _D.FAILED: frozenset(),
    _D.ABORTED: frozenset(),
    _D.ROLLED_BACK: frozenset(),
}

_S = SlotState
SLOT_TRANSITIONS: dict[SlotState, frozenset[SlotState]] = {
    _S.EMPTY: frozenset({_S.STARTING, _S.EMPTY}),
    _S.STARTING: frozenset({_S.LIVE, _S.STANDBY, _S.STOPPING, _S.EMPTY}),
    _S.LIVE: frozenset({_S.STANDBY, _S.STOPPING, _S.EMPTY}),
    _S.STANDBY: frozenset({_S.LIVE, _S.STOPPING, _S.EMPTY}),
    _S.STOPPING: frozenset({_S.EMPTY}),
}


class TransitionError(Exception):
    """A transition the model does not allow: a bug in the caller, never a user's mistake."""


def check_deployment(was: DeploymentState, new: DeploymentState) -> None:
    if new != was and new not in DEPLOYMENT_TRANSITIONS[was]:
        raise TransitionError(f"deployment cannot go from {was} to {new}")


def check_slot(was: SlotState, new: SlotState) -> None:
    if new != was and new not in SLOT_TRANSITIONS[was]:
        raise TransitionError(f"slot cannot go from {was} to {new}")


def other(slot: str | None) -> str:
    return "green" if slot == "blue" else "blue"
