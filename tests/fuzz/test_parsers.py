"""Properties of the parsers that read operator and caller text: the traffic policy
(`routing.policy.parse_policy`), the access file (`edge.access.parse_access`) and model names
(`repository.schema.check_model_name`). Whatever the input, the answer is a parsed value or
BadRequest naming the problem, never another exception."""

from __future__ import annotations

import posixpath
import string
from typing import Any

import yaml
from hypothesis import example, given
from hypothesis import strategies as st

from inferplane.edge.access import AccessSpec, parse_access
from inferplane.errors import BadRequest
from inferplane.repository.schema import MODEL_NAME_MAX, check_model_name, check_version_ref
from inferplane.routing.policy import Policy, parse_policy
from tests.fuzz.strategies import JSON_VALUES

# Every key the policy schema knows, so that generated documents get past the first level.
POLICY_KEYS = [
    "services", "audit", "routes", "model", "version", "weight", "name", "timeout_ms", "match",
    "header", "tenant", "parameter", "values", "route", "sticky", "shadow", "percent",
    "max_inflight", "retries", "attempts", "backoff_ms", "retry_on", "breaker",
    "consecutive_failures", "error_rate", "window", "min_calls", "cooldown_s", "fallback",
    "service", "cache", "size", "ttl_s", "redact", "field", "action", "target",
]  # fmt: skip
ACCESS_KEYS = [
    "keys", "jwt", "jwks_url", "jwks_file", "issuer", "audience", "algorithms", "leeway_s",
    "principal_claim", "tenant_claim", "scopes_claim", "jwks_refresh_s", "mtls", "subject",
    "common_name", "san", "principal", "tenant", "scopes", "metrics", "grants", "targets",
    "quotas", "target", "requests_per_s", "burst", "max_inflight", "rows_per_s", "rows_burst",
]  # fmt: skip
YAML_SCALARS = (
    JSON_VALUES
    | st.sampled_from([float("nan"), float("inf"), -float("inf"), 0, -1, 100, 1e308, "infer"])
    | st.sampled_from(["read", "admin", "open", "RS256", "none", "*", "fraud*", "hash", "drop"])
)


def documents(keys: list[str]) -> st.SearchStrategy[Any]:
    """Nested mappings and lists over the schema's own keys, with odd values in between."""
    return st.recursive(
        YAML_SCALARS,
        lambda inner: (
            st.lists(inner, max_size=3)
            | st.dictionaries(st.sampled_from(keys) | st.text(max_size=4), inner, max_size=4)
        ),
        max_leaves=20,
    )


def only_bad_request(call: Any, *args: Any) -> Any:
    try:
        return call(*args)
    except BadRequest as exc:
        assert exc.message
        return None


@given(documents(POLICY_KEYS))
@example(
    {
        "services": {
            "a": {
                "routes": [{"model": "m", "weight": 100}],
                "retries": {"attempts": 1, "backoff_ms": float("inf")},
            }
        }
    }
)
def test_policy_documents_parse_or_bad_request(doc: Any) -> None:
    text = yaml.safe_dump(doc)
    policy = only_bad_request(parse_policy, text)
    if policy is not None:
        assert isinstance(policy, Policy)
        for service in policy.services.values():
            assert abs(sum(r.weight for r in service.routes) - 100) <= 1e-6
            assert service.retries.backoff_ms < float("inf")


@given(st.text(max_size=200) | st.binary(max_size=200).map(lambda b: b.decode("latin-1")))
@example("[" * 5000)  # PyYAML recursed past the limit: RecursionError
@example("a: &x [*x]")
@example("services: !!python/object:os.system {}")
def test_policy_text_parses_or_bad_request(text: str) -> None:
    only_bad_request(parse_policy, text)


@given(documents(ACCESS_KEYS))
def test_access_documents_parse_or_bad_request(doc: Any) -> None:
    spec = only_bad_request(parse_access, doc)
    if spec is not None:
        assert isinstance(spec, AccessSpec)


NAME_CHARS = string.ascii_letters + string.digits + "._-/\\%\x00 \n:~"


@given(st.text(NAME_CHARS, max_size=140) | st.text(max_size=140))
@example("../x")
@example("a" * MODEL_NAME_MAX)
def test_an_accepted_model_name_is_one_folder_under_the_root(name: str) -> None:
    accepted = only_bad_request(check_model_name, name)
    if accepted is not None:
        root = "/srv/models"
        assert posixpath.normpath(posixpath.join(root, name)) == f"{root}/{name}"
        assert posixpath.dirname(posixpath.join(root, name)) == root
        assert 0 < len(name) <= MODEL_NAME_MAX and name.isascii() and name.isprintable()
        assert ".." not in name and not name.startswith(".")


@given(st.text(NAME_CHARS, max_size=70) | st.integers(-(2**70), 2**70))
def test_a_version_reference_is_a_number_or_an_alias(ref: str | int) -> None:
    checked = only_bad_request(check_version_ref, ref)
    if isinstance(checked, int):
        assert checked >= 1
    elif checked is not None:
        assert checked.isascii() and checked[0].isalpha() and "/" not in checked
