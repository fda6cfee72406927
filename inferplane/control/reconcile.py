"""Reconcile a model repository with a platform file: plan first, then write.

`make_plan` reads the repository and the artifacts and checks everything before anything is
written: new versions are rehearsed through the same `register()` that `inferplane models
register` runs (with a stand-in repository that writes nothing), declared sha256 digests are
compared with the artifacts, versions that exist are compared with what the file says about them
(they are immutable: a difference is refused, never rewritten), and the final state (versions,
aliases, services) is checked for dangling references. `apply_plan` then writes, in an order a
running server (`serve --watch`) can follow: new versions, then aliases, then services.yaml, and
deletions (`prune`) last, once nothing refers to them.
"""

from __future__ import annotations

import difflib
import json
import os
import posixpath
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, cast

import fsspec
import yaml
from fsspec.implementations.local import LocalFileSystem

from inferplane.control.manifest import Manifest, ModelSpec, VersionSpec
from inferplane.errors import BadRequest, InferplaneError, RepositoryError
from inferplane.repository.register import register
from inferplane.repository.schema import ModelConfig
from inferplane.repository.store import CLAIM, CatalogueEntry, Repository, sha256_file
from inferplane.routing.policy import AuditDefaults, Policy, Service, parse_policy
from inferplane.routing.policy_source import SERVICES_FILE

SERVICES_HEADER = (
    "# Written by `inferplane apply` from {source}: edit that file, not this one.\n"
    "# The format is docs/traffic.md's.\n"
)
# metadata keys register writes itself; an existing version is not compared on them unless the
# file declares them
_REGISTER_METADATA = ("created_at", "optimization")


class ApplyRefused(BadRequest):
    """The platform file cannot be applied as it is; nothing was written."""


@dataclass
class NewVersion:
    model: str
    version: int
    spec: VersionSpec
    local_artifact: str  # a local path: the file's own, or a downloaded copy of a URL
    config: ModelConfig  # what register() will write (created_at aside)


@dataclass
class AliasChange:
    model: str
    current: dict[str, int]
    desired: dict[str, int]


@dataclass
class Plan:
    repository: Repository
    source: str
    new_versions: list[NewVersion] = field(default_factory=list)
    alias_changes: list[AliasChange] = field(default_factory=list)
    deletions: list[tuple[str, int]] = field(default_factory=list)
    services_text: str | None = None  # the new services.yaml, when it changes
    services_before: str | None = None  # what the repository has now ("" when none)
    lines: list[str] = field(default_factory=list)  # one per change, in the order of writing
    notes: list[str] = field(default_factory=list)  # what is left as it is, and why

    @property
    def changes(self) -> int:
        return (
            len(self.new_versions)
            + sum(len(_alias_lines(a.model, a.current, a.desired)) for a in self.alias_changes)
            + len(self.deletions)
            + (self.services_text is not None)
        )

    @property
    def services_path(self) -> str:
        return posixpath.join(self.repository.root, SERVICES_FILE)

    def services_diff(self) -> list[str]:
        """A unified diff of services.yaml (empty when it stays as it is)."""
        if self.services_text is None:
            return []
        before = self.services_before or ""
        return list(
            difflib.unified_diff(
                before.splitlines(keepends=True),
                self.services_text.splitlines(keepends=True),
                fromfile=f"a/{SERVICES_FILE}" if before else "/dev/null",
                tofile=f"b/{SERVICES_FILE}",
            )
        )


# -- the plan ------------------------------------------------------------------------------


def make_plan(
    manifest: Manifest, repository: Repository, staging: str, prune: bool = False
) -> Plan:
    """Everything apply would do, checked; raises ApplyRefused listing every problem.

    `staging` is an empty local folder that lives until the plan is applied: remote artifacts
    of new versions are downloaded there (register reads local files).
    """
    prune = prune or manifest.platform.prune
    plan = Plan(repository, manifest.source)
    problems: list[str] = []
    catalogue = _read_catalogue(repository)
    for name, spec in manifest.models.items():
        entry = catalogue.get(name, CatalogueEntry())
        if entry.problems:
            problems += [f"model '{name}' in the repository: {p}" for p in entry.problems]
            continue
        existing = {c.version: c for c in entry.configs}
        for number, vspec in spec.versions.items():
            where = f"models.{name}.versions.{number}"
            try:
                if number in existing:
                    problems += _compare(name, number, vspec, existing[number], manifest.base_dir)
                else:
                    plan.new_versions.append(
                        _new_version(repository, name, number, vspec, manifest.base_dir, staging)
                    )
            except InferplaneError as exc:
                problems.append(f"{where}: {exc.message}")
        for number in sorted(set(existing) - set(spec.versions)):
            if prune:
                plan.deletions.append((name, number))
            else:
                plan.notes.append(
                    f"{name} version {number} is in the repository, not in the file: kept "
                    "(prune deletes it)"
                )
    unmanaged = sorted(set(catalogue) - set(manifest.models))
    if unmanaged:
        plan.notes.append(f"models not in the file, left as they are: {', '.join(unmanaged)}")

    # the final state: what every reference is checked against
    deleted = set(plan.deletions)
    final_versions: dict[str, set[int]] = {
        n: {c.version for c in e.configs} for n, e in catalogue.items()
    }
    final_aliases: dict[str, dict[str, int]] = {n: dict(e.aliases) for n, e in catalogue.items()}
    for name, spec in manifest.models.items():
        final_versions[name] = (final_versions.get(name, set()) | set(spec.versions)) - {
            v for m, v in deleted if m == name
        }
        final_aliases[name] = dict(spec.aliases)
    problems += _alias_problems(manifest.models, final_versions, deleted)

    policy_now, plan.services_before, now_problem = _read_services(repository)
    if manifest.policy is not None:
        policy = manifest.policy
        problems += _reference_problems(policy, final_versions, final_aliases, deleted)
        assert manifest.services_doc is not None
        if policy_now is None or policy_now != policy:
            plan.services_text = SERVICES_HEADER.format(
                source=os.path.basename(manifest.source)
            ) + yaml.safe_dump(manifest.services_doc, sort_keys=False, allow_unicode=True)
    elif now_problem is not None:
        if deleted:
            problems.append(
                f"{SERVICES_FILE} in the repository cannot be read ({now_problem}), so prune "
                "cannot tell whether a service still uses the versions it would delete"
            )
        plan.notes.append(f"{SERVICES_FILE} is not in the file and is left as it is")
    elif policy_now is not None:
        # Left alone, but it must not end up pointing at what this apply removes or moves.
        current_versions = {n: {c.version for c in e.configs} for n, e in catalogue.items()}
        current_aliases = {n: dict(e.aliases) for n, e in catalogue.items()}
        before = set(_reference_problems(policy_now, current_versions, current_aliases, set()))
        after = _reference_problems(policy_now, final_versions, final_aliases, deleted)
        problems += [f"{SERVICES_FILE} in the repository: {p}" for p in after if p not in before]
    if problems:
        count = f"{len(problems)} problems" if len(problems) > 1 else "1 problem"
        raise ApplyRefused(
            f"{manifest.source}: {count}, nothing written:\n  - " + "\n  - ".join(problems)
        )

    # the change lines, in the order apply_plan writes
    for new in plan.new_versions:
        plan.lines.append(f"+ {new.model} version {new.version} ({_summary(new.config)})")
    for name, spec in manifest.models.items():
        current = catalogue[name].aliases if name in catalogue else {}
        if current != spec.aliases:
            plan.alias_changes.append(AliasChange(name, dict(current), dict(spec.aliases)))
            plan.lines += _alias_lines(name, current, spec.aliases)
    if plan.services_text is not None:
        plan.lines += _service_lines(policy_now, manifest.policy)
    for name, number in plan.deletions:
        plan.lines.append(f"- {name} version {number} (prune)")
    return plan


def _read_catalogue(repository: Repository) -> dict[str, CatalogueEntry]:
    try:
        if not repository.exists():
            return {}
        return repository.catalogue()
    except OSError as exc:
        raise RepositoryError(f"cannot read repository {repository.url}: {exc}") from None


def _read_services(repository: Repository) -> tuple[Policy | None, str, str | None]:
    """(the policy services.yaml holds, its text ("" when none), why it cannot be read)."""
    path = posixpath.join(repository.root, SERVICES_FILE)
    try:
        raw = repository.fs.cat_file(path)
    except FileNotFoundError:
        return None, "", None
    except OSError as exc:
        return None, "", f"cannot read it: {exc}"
    text = raw.decode("utf-8", errors="replace")
    try:
        return parse_policy(text, SERVICES_FILE), text, None
    except BadRequest as exc:
        return None, text, exc.message


# -- versions ------------------------------------------------------------------------------


class _Rehearsal:
    """Stands in for the Repository in a rehearsal of register(): it answers the version
    listing and, instead of writing, returns the config add_version would commit (with the
    sha256 of the files register hands it)."""

    def __init__(self, versions: list[int]) -> None:
        self._versions = versions

    def list_versions(self, model: str) -> list[int]:
        return list(self._versions)

    def add_version(self, config: ModelConfig, files: dict[str, str]) -> ModelConfig:
        local = LocalFileSystem()
        sums = {rel: sha256_file(local, src) for rel, src in sorted(files.items())}
        return config.model_copy(update={"sha256": sums})


def _register(
    target: Repository | _Rehearsal, name: str, number: int, spec: VersionSpec, artifact: str
) -> ModelConfig:
    return register(
        cast(Repository, target),  # a _Rehearsal offers the two methods register calls
        name,
        artifact,
        runtime=spec.runtime,
        inputs=[t.spec() for t in spec.inputs] if spec.inputs is not None else None,
        outputs=[t.spec() for t in spec.outputs] if spec.outputs is not None else None,
        batching=spec.batching,
        instances=spec.instances,
        instance_kind=spec.instance_kind,
        device=spec.device,
        options=spec.options,
        metadata=spec.metadata,
        version=number,
        residency=spec.residency,
        idle_unload_s=spec.idle_unload_s,
        memory=spec.resources.memory if spec.resources is not None else None,
    )


def _artifact_fs(artifact: str, base_dir: str) -> tuple[fsspec.AbstractFileSystem, str, bool]:
    """(filesystem, path on it, whether it is local) for an artifact of the file."""
    if "://" not in artifact:
        return LocalFileSystem(), os.path.join(base_dir, os.path.expanduser(artifact)), True
    try:
        fs, path = fsspec.core.url_to_fs(artifact)
    except (ImportError, ValueError) as exc:
        raise BadRequest(f"artifact {artifact}: cannot open it: {exc}") from None
    return fs, path, isinstance(fs, LocalFileSystem)


def _walk_artifact(fs: fsspec.AbstractFileSystem, path: str) -> dict[str, str]:
    """{"": path} for a file; {file relative to the folder: path} for a folder (what register
    copies: __pycache__ left out)."""
    path = path.rstrip("/") or "/"
    if not fs.exists(path):
        raise BadRequest(f"artifact {path} does not exist")
    if not fs.isdir(path):
        return {"": path}
    files: dict[str, str] = {}
    for found in sorted(str(p) for p in fs.find(path)):
        rel = posixpath.relpath(found, path)
        if "__pycache__" not in rel.split("/"):
            files[rel] = found
    if not files:
        raise BadRequest(f"artifact folder {path} is empty")
    return files


def _artifact_digests(artifact: str, base_dir: str) -> dict[str, str]:
    """The artifact's content digests as VersionSpec.digests() gives them, read where it is."""
    fs, path, _ = _artifact_fs(artifact, base_dir)
    try:
        return {rel: sha256_file(fs, p) for rel, p in _walk_artifact(fs, path).items()}
    except OSError as exc:
        raise BadRequest(f"cannot read artifact {artifact}: {exc}") from None


def _stored_digests(config: ModelConfig) -> dict[str, str]:
    """The artifact's content digests as model.yaml records them."""
    artifact = config.artifact.rstrip("/")
    if artifact in config.sha256:
        return {"": config.sha256[artifact]}
    prefix = artifact + "/"
    return {k[len(prefix) :]: v for k, v in config.sha256.items() if k.startswith(prefix)}


def _digest_problem(a: dict[str, str], b: dict[str, str], a_where: str, b_where: str) -> str | None:
    """How two sets of content digests (VersionSpec.digests() form) differ, or None."""
    if a == b:
        return None
    if ("" in a) != ("" in b):

        def kind(d: dict[str, str]) -> str:
            return "one file" if "" in d else "a folder (file -> digest)"

        return f"{a_where} is {kind(a)}, {b_where} {kind(b)}"
    for rel in sorted(set(a) | set(b)):
        name = f"'{rel}'" if rel else "the artifact"
        if rel not in b:
            return f"file {name} is in {a_where}, not in {b_where}"
        if rel not in a:
            return f"file {name} is in {b_where}, not in {a_where}"
        if a[rel] != b[rel]:
            return f"sha256 of {name} is {a[rel][:12]}… in {a_where}, {b[rel][:12]}… in {b_where}"
    return None  # pragma: no cover (equal dicts returned above)


def _new_version(
    repository: Repository,
    name: str,
    number: int,
    spec: VersionSpec,
    base_dir: str,
    staging: str,
) -> NewVersion:
    vdir = repository.version_path(name, number)
    if repository.fs.exists(posixpath.join(vdir, CLAIM)):
        raise ApplyRefused(
            f"version {number} of '{name}' was taken before (a version deleted by prune, or a "
            "registration that did not finish): version numbers are never reused; pick another"
        )
    fs, path, local = _artifact_fs(spec.artifact, base_dir)
    if local:
        artifact = path
    else:  # register reads local files: download a copy first
        files = _walk_artifact(fs, path)
        dest = os.path.join(staging, f"{name}-{number}", posixpath.basename(path.rstrip("/")))
        try:
            for rel, src in files.items():
                target = os.path.join(dest, rel) if rel else dest
                os.makedirs(os.path.dirname(target), exist_ok=True)
                fs.get_file(src, target)
        except OSError as exc:
            raise BadRequest(f"cannot download artifact {spec.artifact}: {exc}") from None
        artifact = dest
    try:
        config = _register(_Rehearsal([]), name, number, spec, artifact)
    except InferplaneError as exc:
        if "name:DATATYPE:shape" not in exc.message:
            raise
        # register's message speaks of command-line options; this file has fields
        head = exc.message.split("; pass ")[0]
        wanted = " and ".join(
            f
            for f, flag in (("inputs", "--input "), ("outputs", "--output "))
            if flag in exc.message
        )
        raise BadRequest(f"{head}; declare {wanted}: [{{name, datatype, shape}}]") from None
    except Exception as exc:  # a framework's own error about an artifact it cannot read
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
        raise BadRequest(
            f"artifact {spec.artifact} cannot be read as a {spec.runtime or 'model'}: "
            f"{type(exc).__name__}: {first}"
        ) from None
    declared = spec.digests()
    if declared is not None:
        problem = _digest_problem(
            _stored_digests(config), declared, f"artifact {spec.artifact}", "the file's sha256"
        )
        if problem is not None:
            raise ApplyRefused(f"{problem}; refusing to register it")
    return NewVersion(name, number, spec, artifact, config)


def _fields(spec: VersionSpec) -> dict[str, Any]:
    """What the file says of a version's model.yaml: the settings register writes (with its
    defaults for the ones the file leaves out) and, when declared, runtime and signature
    (left out, they come from the artifact, which the digest covers)."""
    out: dict[str, Any] = {
        "batching": spec.batching,
        "instances": spec.instances,
        "instance_kind": spec.instance_kind,
        "device": spec.device,
        "options": spec.options,
        "metadata": spec.metadata,
        "residency": spec.residency,
        "idle_unload_s": spec.idle_unload_s,
        "resources": spec.resources,
    }
    for key in ("runtime", "inputs", "outputs"):
        if getattr(spec, key) is not None:
            out[key] = getattr(spec, key)
    return out


def _shown(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(_shown(v) for v in value) + "]"
    if hasattr(value, "model_dump"):
        value = value.model_dump(mode="json", exclude_none=True)
    return json.dumps(value, sort_keys=True, default=str)


def _compare(
    name: str, number: int, spec: VersionSpec, config: ModelConfig, base_dir: str
) -> list[str]:
    """Why the version the repository holds is not the one the file declares ([] when it is)."""
    problems: list[str] = []
    where = f"models.{name}.versions.{number}"
    for key, declared in _fields(spec).items():
        stored = getattr(config, key)
        if key == "metadata":
            stored = {
                k: v for k, v in stored.items() if k not in _REGISTER_METADATA or k in declared
            }
        if stored != declared:
            problems.append(
                f"{where}.{key}: the repository's {name} version {number} has "
                f"{_shown(stored)}, the file says {_shown(declared)}"
            )
    declared_digests = spec.digests()
    stored_digests = _stored_digests(config)
    if declared_digests is not None:  # the artifact itself is not read again
        problem = _digest_problem(
            declared_digests, stored_digests, "the file's sha256", "the repository"
        )
        if problem is not None:
            problems.append(
                f"{where}.sha256: {name} version {number} in the repository has another "
                f"artifact ({problem})"
            )
    else:
        try:
            actual = _artifact_digests(spec.artifact, base_dir)
        except BadRequest as exc:
            problems.append(
                f"{where}.artifact: {exc.message} (declare its sha256 to compare without it)"
            )
        else:
            problem = _digest_problem(
                actual, stored_digests, f"artifact {spec.artifact}", "the repository"
            )
            if problem is not None:
                problems.append(
                    f"{where}.artifact: differs from {name} version {number} in the repository "
                    f"({problem})"
                )
    if problems:
        problems[-1] += (
            "; versions are immutable: give the new settings or artifact a new version number"
        )
    return problems


def _summary(config: ModelConfig) -> str:
    digests = _stored_digests(config)
    if "" in digests:
        return f"{config.runtime}, sha256 {digests[''][:12]}…"
    return f"{config.runtime}, {len(digests)} files"


# -- aliases and references ----------------------------------------------------------------


def _alias_lines(model: str, current: dict[str, int], desired: dict[str, int]) -> list[str]:
    lines: list[str] = []
    for alias in sorted(set(current) | set(desired)):
        was, now = current.get(alias), desired.get(alias)
        if was == now:
            continue
        if was is None:
            lines.append(f"+ {model} alias {alias}: {now}")
        elif now is None:
            lines.append(f"- {model} alias {alias} (was {was})")
        else:
            lines.append(f"~ {model} alias {alias}: {was} -> {now}")
    return lines


def _alias_problems(
    models: dict[str, ModelSpec], final: dict[str, set[int]], deleted: set[tuple[str, int]]
) -> list[str]:
    problems: list[str] = []
    for name, spec in models.items():
        for alias, number in spec.aliases.items():
            if (name, number) in deleted:
                problems.append(
                    f"models.{name}.aliases.{alias}: points at version {number}, which prune "
                    "would delete (it is not in the file)"
                )
            elif number not in final[name]:
                problems.append(
                    f"models.{name}.aliases.{alias}: version {number} is neither in the "
                    "repository nor in the file"
                )
    return problems


def _reference_problems(
    policy: Policy,
    versions: dict[str, set[int]],
    aliases: dict[str, dict[str, int]],
    deleted: set[tuple[str, int]],
) -> list[str]:
    """routing.policy.check_references against a state that is not written yet, one message per
    problem, naming the prune that would cause it."""
    problems: list[str] = []
    known = {n for n, v in versions.items() if v}
    for name in policy.services:
        if name in known:
            problems.append(f"service '{name}' has the name of a model")
    for where, target in policy.targets():
        ref = target.version
        if target.model not in known:
            gone = any(m == target.model for m, _ in deleted)
            problems.append(
                f"{where}: model '{target.model}' "
                + ("would have no version left after prune" if gone else "is unknown")
            )
        elif ref is not None and ref.isdigit() and (target.model, int(ref)) in deleted:
            problems.append(f"{where}: uses {target.model} version {ref}, which prune would delete")
        elif ref is not None and ref.isdigit() and int(ref) not in versions[target.model]:
            problems.append(f"{where}: model '{target.model}' has no version {ref}")
        elif ref is not None and not ref.isdigit() and ref not in aliases.get(target.model, {}):
            problems.append(f"{where}: model '{target.model}' has no alias '{ref}'")
    return problems


def _describe_service(service: Service) -> str:
    routes = ", ".join(f"{r.model}:{r.version or 'default'} {r.weight:g}%" for r in service.routes)
    return f"routes {routes}"


def _service_lines(before: Policy | None, after: Policy | None) -> list[str]:
    old = before.services if before is not None else {}
    new = after.services if after is not None else {}
    lines: list[str] = []
    for name in sorted(set(old) | set(new)):
        if name not in old:
            lines.append(f"+ service {name} ({_describe_service(new[name])})")
        elif name not in new:
            lines.append(f"- service {name}")
        elif old[name] != new[name]:
            changed = [
                key
                for key in Service.model_fields
                if getattr(old[name], key) != getattr(new[name], key)
            ]
            if "routes" in changed:
                lines.append(
                    f"~ service {name} routes: "
                    f"{_describe_service(old[name]).removeprefix('routes ')} -> "
                    f"{_describe_service(new[name]).removeprefix('routes ')}"
                )
                changed.remove("routes")
            if changed:
                lines.append(f"~ service {name}: {', '.join(changed)} changed")
    if (before.audit if before else AuditDefaults()) != (after.audit if after else AuditDefaults()):
        lines.append("~ services audit defaults changed")
    if not lines:  # a file that differs in what it does not declare, or that did not parse
        lines.append(f"~ {SERVICES_FILE} rewritten")
    return lines


# -- writing -------------------------------------------------------------------------------


def apply_plan(plan: Plan, progress: Callable[[str], None] | None = None) -> int:
    """Write the plan: new versions, aliases, services.yaml, then deletions. Returns the number
    of changes written. A failure part way leaves what was written (each step is whole: a
    version appears with its model.yaml, a file is replaced at once); run apply again."""
    repo = plan.repository
    steps: list[tuple[str, Callable[[], object]]] = []
    for new in plan.new_versions:
        steps.append(
            (
                f"+ {new.model} version {new.version}",
                partial(_register, repo, new.model, new.version, new.spec, new.local_artifact),
            )
        )
    for change in plan.alias_changes:
        # one write per model: a watching server never sees half of the moves
        steps.append(
            (
                f"aliases of {change.model}",
                partial(repo._write_aliases, change.model, change.desired),
            )
        )
    if plan.services_text is not None:
        steps.append(
            (SERVICES_FILE, partial(repo._write_text, plan.services_path, plan.services_text))
        )
    for name, number in plan.deletions:
        steps.append((f"- {name} version {number}", partial(repo.delete_version, name, number)))
    for done, (what, step) in enumerate(steps):
        try:
            step()
        except (InferplaneError, OSError) as exc:
            message = exc.message if isinstance(exc, InferplaneError) else str(exc)
            raise RepositoryError(
                f"{what}: {message} (after {done} of {len(steps)} writes; what was written "
                "stays: fix the cause and apply again)"
            ) from None
        if progress is not None:
            progress(what)
    return plan.changes
