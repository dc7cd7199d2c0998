"""The dependency firewall: every node's requirements against the protected packages. Pure.

Protected: the installed ``torch``, ``torchvision``, ``torchaudio``, ``xformers`` (exact
version), ``numpy`` (its major version) and ONE OpenCV distribution. A request for any of the
four OpenCV wheels (they all ship ``cv2/`` and overwrite each other) is rewritten to the kept
one; a node whose requirement would replace a protected package is refused, with one line
naming the node, the package, what it wanted and what is kept. The other nodes install.

    decide(requested, protected, opencv=...)  -> Firewall (verdicts, rewrites, the lines to
                                                install, the constraints that pin the rest)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

EXACT = ("torch", "torchvision", "torchaudio", "xformers")
MAJOR = ("numpy",)
OPENCV = (
    "opencv-python",
    "opencv-python-headless",
    "opencv-contrib-python",
    "opencv-contrib-python-headless",
)
# With no OpenCV installed and none configured: the superset (contrib) without the X11 libraries.
DEFAULT_OPENCV = "opencv-contrib-python-headless"
PROTECTED = (*EXACT, *MAJOR, *OPENCV)


@dataclasses.dataclass(frozen=True)
class Refusal:
    node: str
    package: str
    wanted: str  # the requirement as the node wrote it
    kept: str  # the version installed (numpy: "1.26.4 (major 1)")

    @property
    def line(self) -> str:
        return f"node {self.node}: refused: wants {self.wanted}, {self.package} {self.kept} is kept"

    def to_dict(self) -> dict[str, str]:
        return {"node": self.node, "package": self.package, "wanted": self.wanted, "kept": self.kept}


@dataclasses.dataclass(frozen=True)
class Rewrite:
    node: str
    requested: str
    installed_as: str

    @property
    def line(self) -> str:
        return f"node {self.node}: {self.requested} rewritten to {self.installed_as}"

    def to_dict(self) -> dict[str, str]:
        return {"node": self.node, "requested": self.requested, "rewritten": self.installed_as}


@dataclasses.dataclass(frozen=True)
class Firewall:
    """The decision over every node's requirements."""

    accepted: Mapping[str, tuple[str, ...]]  # node -> its requirement lines, rewritten
    refused: tuple[Refusal, ...]
    rewrites: tuple[Rewrite, ...]
    protected: Mapping[str, str]  # name -> installed version (what is kept)
    opencv: str  # the one OpenCV distribution
    constraints: tuple[str, ...]  # pins for the resolver
    warnings: tuple[str, ...] = ()

    @property
    def refused_nodes(self) -> dict[str, tuple[Refusal, ...]]:
        out: dict[str, list[Refusal]] = {}
        for r in self.refused:
            out.setdefault(r.node, []).append(r)
        return {k: tuple(v) for k, v in out.items()}

    @property
    def lines(self) -> tuple[str, ...]:
        """The combined requirement set of every accepted node, in order, without repeats."""
        seen: dict[str, None] = {}
        for node_lines in self.accepted.values():
            for line in node_lines:
                seen.setdefault(line, None)
        return tuple(seen)

    def to_dict(self) -> dict[str, Any]:
        return {
            "protected": dict(self.protected),
            "opencv": self.opencv,
            "refused": [r.to_dict() for r in self.refused],
            "rewritten": [r.to_dict() for r in self.rewrites],
            "warnings": list(self.warnings),
        }


def requirement_lines(text: str) -> list[str]:
    """The lines of a requirements.txt that mean something: comments, blanks, continuations out."""
    out: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.split(" #", 1)[0].rstrip() if not raw.lstrip().startswith("#") else ""
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = (pending + line).strip()
        pending = ""
        if line:
            out.append(line)
    return out


def choose_opencv(installed: Mapping[str, str], configured: str = "") -> str:
    """The one OpenCV distribution: the configured one, else the installed one, else the default."""
    if configured:
        return configured
    for name in OPENCV[::-1]:  # if several are installed, the most complete one wins
        if name in installed:
            return name
    return DEFAULT_OPENCV


def _major_ok(req: Requirement, installed: Version) -> bool:
    """Whether some version with the installed major satisfies ``req`` (probes, no index)."""
    probes = [installed, Version(f"{installed.major}"), Version(f"{installed.major}.999999")]
    for spec in req.specifier:
        try:
            v = Version(spec.version.replace(".*", ""))
        except InvalidVersion:
            continue
        if v.major == installed.major:
            rel = list(v.release) + [0] * (3 - len(v.release))
            probes += [v, Version(".".join(map(str, [*rel[:2], rel[2] + 1])))]
    return any(req.specifier.contains(p, prereleases=True) for p in probes)


def _check(
    node: str, req: Requirement, name: str, protected: Mapping[str, str]
) -> Refusal | None:
    kept = protected.get(name)
    if kept is None:
        return None
    try:
        version = Version(kept)
    except InvalidVersion:
        return None
    if name in MAJOR:
        if _major_ok(req, version):
            return None
        return Refusal(node, name, str(req), f"{kept} (major {version.major})")
    if req.specifier.contains(version, prereleases=True):
        return None
    return Refusal(node, name, str(req), kept)


def decide(
    requested: Mapping[str, Sequence[str]],
    installed: Mapping[str, str],
    *,
    opencv: str = "",
) -> Firewall:
    """Verdicts for every node's requirement lines against the installed protected packages.

    Args:
        requested: node name -> its requirement lines (see :func:`requirement_lines`), in order.
        installed: canonical distribution name -> installed version (any names; the protected
            ones are picked out).
        opencv: the OpenCV distribution to keep (empty: the installed one, else the default).
    """
    kept_cv = choose_opencv(installed, opencv)
    protected = {n: installed[n] for n in (*EXACT, *MAJOR) if n in installed}
    if kept_cv in installed:
        protected[kept_cv] = installed[kept_cv]
    accepted: dict[str, tuple[str, ...]] = {}
    refused: list[Refusal] = []
    rewrites: list[Rewrite] = []
    warnings: list[str] = []
    for node, lines in requested.items():
        out: list[str] = []
        node_refusals: list[Refusal] = []
        for line in lines:
            if line.startswith("-"):
                warnings.append(f"node {node}: requirements option {line.split()[0]!r} ignored")
                continue
            try:
                req = Requirement(line)
            except InvalidRequirement:
                out.append(line)  # a URL or a form we do not read: the resolver decides
                continue
            name: str = canonicalize_name(req.name)
            if req.marker is not None and not req.marker.evaluate():
                out.append(str(req))  # not for this platform: nothing to protect
                continue
            if name in OPENCV and name != kept_cv:
                rewritten = Requirement(str(req))
                rewritten.name = kept_cv
                rewrites.append(Rewrite(node, str(req), str(rewritten)))
                req, name = rewritten, kept_cv
            refusal = _check(node, req, name, protected)
            if refusal is not None:
                node_refusals.append(refusal)
            else:
                out.append(str(req))
        if node_refusals:
            refused += node_refusals
        else:
            accepted[node] = tuple(out)
    return Firewall(
        accepted=accepted,
        refused=tuple(refused),
        rewrites=tuple(rewrites),
        protected=protected,
        opencv=kept_cv,
        constraints=constraint_lines(protected),
        warnings=tuple(warnings),
    )


def constraint_lines(protected: Mapping[str, str]) -> tuple[str, ...]:
    """torch & co. pinned exactly, numpy within its major, the kept OpenCV pinned."""
    out: list[str] = []
    for name, version in sorted(protected.items()):
        if name in MAJOR:
            try:
                major = Version(version).major
            except InvalidVersion:
                continue
            out.append(f"{name}>={major},<{major + 1}")
        else:
            out.append(f"{name}=={version}")
    return tuple(out)
