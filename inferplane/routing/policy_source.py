"""Where a server's traffic policy comes from: a YAML file on disk or any fsspec URL, re-read
when it changes (`serve --watch`). A file that fails its checks is refused and the policy in
force stays, so a typo never takes a service down."""

from __future__ import annotations

import hashlib
import logging

import fsspec

from inferplane.errors import BadRequest
from inferplane.routing.policy import Policy, parse_policy
from inferplane.routing.services import Services

log = logging.getLogger("inferplane.routing")

SERVICES_FILE = "services.yaml"


def default_services_url(repository: str) -> str:
    return repository.rstrip("/") + "/" + SERVICES_FILE


def read_policy(url: str) -> tuple[Policy, str] | None:
    """(checked policy, content digest), or None when there is no such file."""
    fs, path = fsspec.core.url_to_fs(url)
    if not fs.exists(path):
        return None
    with fs.open(path, "rb") as f:
        raw = f.read()
    text = raw.decode("utf-8", errors="replace")
    return parse_policy(text, url), hashlib.sha256(raw).hexdigest()


class PolicySource:
    def __init__(self, url: str, services: Services, required: bool = False) -> None:
        self.url = url
        self.services = services
        self.required = required
        self.digest: str | None = None

    def load(self) -> bool:
        """Apply the file if it changed since the last load; True when a new policy is in force.

        Raises BadRequest (and changes nothing) for a file that fails its checks.
        """
        found = read_policy(self.url)
        if found is None:
            if self.required:
                raise BadRequest(f"services file {self.url} does not exist")
            if self.digest is not None:
                log.warning("services file %s is gone; keeping the policy in force", self.url)
            return False
        policy, digest = found
        if digest == self.digest:
            return False
        self.services.apply(policy, self.url)
        self.digest = digest
        names = ", ".join(sorted(policy.services)) or "none"
        log.info("traffic policy from %s in force (services: %s)", self.url, names)
        return True

    def load_logged(self) -> None:
        try:
            self.load()
        except BadRequest as exc:
            log.error("%s; the previous policy stays in force", exc.message)
        except OSError as exc:
            log.error("cannot read %s: %s; the previous policy stays in force", self.url, exc)
