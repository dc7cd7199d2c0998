"""GPU fault events and what to do about them, the way NVIDIA's device plugin decides. Pure.

An NVML event listener (:mod:`orchestrator.machine.nvml_events`) turns each NVML event into a
:class:`GpuEvent`; :func:`classify` gives its :class:`Verdict`, and :class:`GpuHealth` folds the
events of one GPU into what the monitor shows (failed or not, why, the last Xid, ECC counts).

Classification follows the NVIDIA Kubernetes device plugin (``rm/health.go``):

* Xids 13, 31, 43, 45 and 68 are application errors (a graphics engine exception, a memory page
  fault, a stopped or preempted context, a video processor exception): the GPU is fine, the
  process that ran on it is not. The instance on that GPU is restarted.
* Any other critical Xid (e.g. 48 double-bit ECC, 63/64 row remapping, 74 NVLink, 79 fallen off
  the bus, 94/95 contained/uncontained ECC) marks the GPU failed: no more jobs are routed to it,
  its instance is stopped, and ``/readyz``, ``/gpus``, ``status`` and the metrics say so.
* Single- and double-bit ECC events are counted only (the device plugin ignores them too: an
  uncorrectable error also raises its own critical Xid, 48 or 94/95, which is what acts).
* An event NVML could not tie to a device applies to every GPU (the device plugin marks them all
  unhealthy, since it cannot tell which one failed).
"""

from __future__ import annotations

import dataclasses
import enum

APPLICATION_XIDS = frozenset({13, 31, 43, 45, 68})

# What the common critical Xids mean (NVIDIA's Xid catalogue), for the reasons shown to people.
XID_MEANING: dict[int, str] = {
    13: "graphics engine exception",
    31: "GPU memory page fault",
    43: "GPU stopped processing",
    45: "preemptive cleanup after previous errors",
    48: "double-bit ECC error",
    61: "internal micro-controller breakpoint",
    62: "internal micro-controller halt",
    63: "ECC page retirement or row remapping recorded",
    64: "ECC page retirement or row remapping failure",
    68: "video processor exception",
    74: "NVLink error",
    79: "GPU has fallen off the bus",
    92: "high single-bit ECC error rate",
    94: "contained ECC error",
    95: "uncontained ECC error",
    109: "context switch timeout",
    119: "GSP RPC timeout",
    120: "GSP error",
}


class EventKind(enum.Enum):
    XID = "xid"
    ECC_SINGLE = "ecc_single"  # single-bit (corrected) ECC error
    ECC_DOUBLE = "ecc_double"  # double-bit (uncorrected) ECC error


class Verdict(enum.Enum):
    RESTART_INSTANCE = "restart_instance"  # an application error: restart that GPU's instance
    MARK_FAILED = "mark_failed"  # the GPU is broken: stop routing, stop its instance
    COUNT = "count"  # recorded and exported only


@dataclasses.dataclass(frozen=True)
class GpuEvent:
    """One NVML event. ``index`` None: NVML did not say which GPU (applies to every one)."""

    kind: EventKind
    index: int | None
    xid: int = 0  # the Xid for XID events (NVML's eventData)
    at: float = 0.0  # epoch seconds


def describe_xid(xid: int) -> str:
    meaning = XID_MEANING.get(xid)
    return f"Xid {xid} ({meaning})" if meaning else f"Xid {xid}"


def classify(event: GpuEvent) -> Verdict:
    """What the monitor does about ``event`` (see the module's docstring)."""
    if event.kind is not EventKind.XID:
        return Verdict.COUNT
    if event.xid in APPLICATION_XIDS:
        return Verdict.RESTART_INSTANCE
    return Verdict.MARK_FAILED


@dataclasses.dataclass(frozen=True)
class GpuHealth:
    """What the fault events of one GPU add up to (``failed``: ``reason`` says why)."""

    failed: bool = False
    reason: str = ""
    failed_xid: int | None = None  # the Xid that failed the GPU
    last_xid: int | None = None  # None: no Xid seen since the monitor started
    xid_events: int = 0
    ecc_single: int = 0
    ecc_double: int = 0
    listening: bool = False  # the event listener registered for this GPU
    listen_error: str = ""  # why it could not ("" when it did or was not asked)

    def apply(self, event: GpuEvent) -> tuple[GpuHealth, Verdict]:
        """This GPU's health after ``event``, and the verdict to act on.

        A GPU already failed stays failed (its instance is stopped; nothing to restart).
        """
        verdict = classify(event)
        if event.kind is EventKind.ECC_SINGLE:
            return dataclasses.replace(self, ecc_single=self.ecc_single + 1), verdict
        if event.kind is EventKind.ECC_DOUBLE:
            return dataclasses.replace(self, ecc_double=self.ecc_double + 1), verdict
        new = dataclasses.replace(self, last_xid=event.xid, xid_events=self.xid_events + 1)
        if verdict is Verdict.MARK_FAILED and not self.failed:
            new = dataclasses.replace(
                new, failed=True, failed_xid=event.xid, reason=f"critical {describe_xid(event.xid)}"
            )
        if self.failed:
            verdict = Verdict.COUNT  # already failed and stopped: nothing more to do
        return new, verdict

    @property
    def failed_reason_label(self) -> str:
        """The ``reason`` label of ``orchestrator_gpu_failed``: ``xid_<N>``, bounded by the Xid catalogue."""
        return f"xid_{self.failed_xid}" if self.failed_xid is not None else ""
