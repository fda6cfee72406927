"""Resolve a target and version reference to one loaded version.

A target is a model name, or a service name (see `routing.services`): for metadata, readiness and
config a service stands for its first route's version; predictions through a service are routed
per request by its traffic policy.
"""

from __future__ import annotations

from inferplane.engine.manager import LoadedVersion, ModelManager, State
from inferplane.errors import NotFound, Unavailable

PRODUCTION = "production"


class Router:
    def __init__(self, manager: ModelManager) -> None:
        self.manager = manager
        # service name -> (model, version or alias) of its first route; set by Services.apply
        self.service_defaults: dict[str, tuple[str, str | None]] = {}

    def lookup(self, target: str, version: str | None = None) -> tuple[LoadedVersion, str]:
        """(version in whatever state, route decision). No version: `production`, else latest."""
        if target in self.service_defaults and target not in self.manager.models:
            if version:
                raise NotFound(
                    f"'{target}' is a service: call it without a version, or call a model's "
                    "version directly"
                )
            model, ref = self.service_defaults[target]
            return self.lookup(model, ref)
        entry = self.manager.entry(target)
        if not entry.versions:
            raise Unavailable(f"model '{target}' has no loadable version")
        if version is None or version == "":
            number = entry.aliases.get(PRODUCTION, max(entry.versions))
            decision = "production" if PRODUCTION in entry.aliases else "latest"
        elif version.isascii() and version.isdigit():  # not '²', which int() refuses
            number, decision = int(version), "direct"
        elif version in entry.aliases:
            number, decision = entry.aliases[version], f"alias:{version}"
        else:
            raise NotFound(f"model '{target}' has no version or alias '{version}'")
        lv = entry.versions.get(number)
        if lv is None:
            raise NotFound(f"model '{target}' has no version {number}")
        return lv, decision

    def resolve(self, target: str, version: str | None = None) -> tuple[LoadedVersion, str]:
        """Like `lookup`, but only a version that is loaded or may be loaded now (on demand):
        others answer 503 with the reason. The caller activates a version that is not READY."""
        lv, decision = self.lookup(target, version)
        if lv.state is not State.READY:
            self.manager.check_servable(lv)
        return lv, decision
