"""Field-level redaction of the payloads the audit trail samples (docs/audit.md).

A rule names an input tensor (`email`) or one column of its last axis (`features[3]`) and an
action: `hash` replaces each value by a keyed digest (HMAC-SHA256 under the audit salt), `drop`
removes it. The rules of one target compile into a `Redactor` once; `Redactor.capture` turns a
request's inputs into the audit record's `payload_hash` and `payload` with the rules applied, so
the raw values of a redacted field never reach a record, and never reach the sink.

This module knows nothing of services files: `inferplane.routing.policy` parses the rules and
hands them over as `RedactRule`s.
"""

from __future__ import annotations

import fnmatch
import functools
import hashlib
import hmac
import logging
import os
import re
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, cast

import orjson

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger("inferplane.audit")

Action = Literal["hash", "drop"]
ACTIONS: tuple[Action, ...] = ("hash", "drop")
SALT_ENV = "INFERPLANE_AUDIT_SALT"
HASH_PREFIX = "hmac-sha256:"  # says the digest is keyed: nobody can recompute it without the salt
MAX_VALUES = 256  # values kept per tensor in a sampled payload
# Targets seen with default rules, remembered up to this many: callers choose the target names
# (unknown ones included), so the memo must not grow with them.
_MEMO_LIMIT = 4096
_STRICTNESS = {None: 0, "hash": 1, "drop": 2}
_FIELD = re.compile(r"^(?P<name>[^\[\]]+)(?:\[(?P<index>[^\[\]]*)\])?$")


@dataclass(frozen=True, slots=True)
class RedactRule:
    tensor: str
    column: int | None  # None: the whole tensor; else this index of the last axis
    action: Action


def parse_field(text: str) -> tuple[str, int | None]:
    """(tensor, column) of `NAME` or `NAME[COLUMN]`; ValueError with a precise message."""
    if not text or not text.strip():
        raise ValueError("field is empty; name an input tensor, e.g. email or features[3]")
    match = _FIELD.match(text)
    if match is None:
        raise ValueError(
            f"field '{text}' is not NAME or NAME[COLUMN] (one column of the tensor's last axis, "
            "e.g. features[3])"
        )
    index = match.group("index")
    if index is None:
        return match.group("name"), None
    if not index.isascii() or not index.isdigit():
        raise ValueError(
            f"field '{text}': column '{index}' is not a non-negative integer (e.g. features[3])"
        )
    return match.group("name"), int(index)


def parse_action(text: object) -> Action:
    if text not in ACTIONS:
        raise ValueError(f"unknown action '{text}'; use one of: {', '.join(ACTIONS)}")
    return text


def parse_rule(field: str, action: object) -> RedactRule:
    tensor, column = parse_field(field)
    return RedactRule(tensor, column, parse_action(action))


@functools.cache
def audit_salt() -> bytes:
    """The HMAC key of hashed fields: $INFERPLANE_AUDIT_SALT, else random for this process."""
    value = os.environ.get(SALT_ENV, "")
    if value:
        return value.encode()
    log.warning(
        "%s is not set: hashed audit fields use a random salt of this process, so their hashes "
        "match only within this process (set it to a secret shared by all replicas to join "
        "hashes across processes and restarts)",
        SALT_ENV,
    )
    return secrets.token_bytes(32)


@dataclass(frozen=True, slots=True)
class _TensorRules:
    whole: Action | None
    columns: Mapping[int, Action]  # only columns stricter than `whole`
    label: Mapping[str, str]  # what the payload says was done: {"*": "hash", "3": "drop"}

    def at(self, column: int) -> Action | None:
        return self.columns.get(column, self.whole)


class Redactor:
    """The redaction rules of one target, compiled: by tensor name, the strictest action wins
    (drop over hash) where two rules cover the same values."""

    def __init__(self, rules: Iterable[RedactRule] = (), salt: bytes | None = None) -> None:
        self.rules = tuple(rules)
        whole: dict[str, Action] = {}
        columns: dict[str, dict[int, Action]] = {}
        for rule in self.rules:
            if rule.column is None:
                whole[rule.tensor] = _stricter(whole.get(rule.tensor), rule.action)
            else:
                cols = columns.setdefault(rule.tensor, {})
                cols[rule.column] = _stricter(cols.get(rule.column), rule.action)
        self.tensors: dict[str, _TensorRules] = {}
        for name in whole.keys() | columns.keys():
            w = whole.get(name)
            cols = {  # nothing is stricter than a whole-tensor drop: no columns then
                c: a
                for c, a in sorted(columns.get(name, {}).items())
                if _STRICTNESS[a] > _STRICTNESS[w]
            }
            label = ({"*": w} if w else {}) | {str(c): a for c, a in cols.items()}
            self.tensors[name] = _TensorRules(w, cols, label)
        needs_key = any(
            t.whole == "hash" or "hash" in t.columns.values() for t in self.tensors.values()
        )
        # The key is only asked for (and a missing salt only reported) when something hashes.
        self._mac = hmac.new(salt or audit_salt(), digestmod=hashlib.sha256) if needs_key else None
        self._warned: set[tuple[str, tuple[int, ...]]] = set()
        self._capture_failed = False

    def __bool__(self) -> bool:
        return bool(self.tensors)

    # -- capture -----------------------------------------------------------------------------

    def capture(
        self, inputs: Mapping[str, np.ndarray], max_values: int = MAX_VALUES
    ) -> tuple[str | None, str | None]:
        """(payload_hash, payload) of a request's inputs, both with the rules applied; (None,
        None) when the inputs hold something that cannot be captured (logged once)."""
        try:
            return self.digest(inputs), self.payload_json(inputs, max_values)
        except Exception:
            # Called as the request finishes: an audit detail must never turn its answer into
            # an error, and a payload half redacted is not kept.
            if not self._capture_failed:
                self._capture_failed = True
                log.exception("audit payload capture failed; the record keeps no payload")
            return None, None

    def digest(self, inputs: Mapping[str, np.ndarray]) -> str:
        """sha256 over names, dtypes, shapes and the values a redacted copy keeps.

        Kept values are hashed as they are, hashed ones through the keyed digest only, dropped
        ones not at all: the result tells no more about a redacted field than the payload does,
        so nobody can confirm a guessed value by hashing it. Equal inputs still hash equal.
        """
        digest = hashlib.sha256()
        for name in sorted(inputs):
            arr = inputs[name]
            digest.update(f"{name}\0{arr.dtype.str}\0{arr.shape}\0".encode())
            rules = self.tensors.get(name)
            if rules is None:
                _feed(digest, arr)
                continue
            if not self._fits(name, arr, rules):
                digest.update(b"\0drop\0")
                continue
            digest.update(orjson.dumps(rules.label))
            if not rules.columns:
                if rules.whole == "hash":
                    digest.update(self._keyed(arr))
                continue
            width = arr.shape[-1]
            kept = [c for c in range(width) if rules.at(c) is None]
            hashed = [c for c in range(width) if rules.at(c) == "hash"]
            if kept:
                _feed(digest, arr[..., kept])
            if hashed:
                digest.update(self._keyed(arr[..., hashed]))
        return digest.hexdigest()

    def payload_json(self, inputs: Mapping[str, np.ndarray], max_values: int = MAX_VALUES) -> str:
        """The inputs as JSON ({name: {dtype, shape, data}}), at most `max_values` values per
        tensor (then `"truncated": true`); a redacted tensor also says `"redacted": {...}` (which
        columns, `*` for all, got which action), a dropped one has no `data`, a dropped column is
        null and a hashed value is `"hmac-sha256:<hex>"`."""
        out: dict[str, dict[str, Any]] = {}
        for name, arr in inputs.items():
            entry: dict[str, Any] = {"dtype": arr.dtype.name, "shape": list(arr.shape)}
            out[name] = entry
            rules = self.tensors.get(name)
            if rules is not None and (rules.whole == "drop" or not self._fits(name, arr, rules)):
                entry["redacted"] = {"*": "drop"}
                continue
            flat = arr.ravel()
            values = flat[:max_values].tolist()
            if rules is None:
                if arr.dtype.kind in "OSU":
                    values = [_text(v) for v in values]
            elif not rules.columns:  # the whole tensor hashed
                values = [self._hash(v) for v in values]
            else:
                width = arr.shape[-1]
                act = [rules.at(c) for c in range(width)]
                values = [self._apply(act[k % width], v) for k, v in enumerate(values)]
            entry["data"] = values
            if rules is not None:
                entry["redacted"] = rules.label
            if flat.size > max_values:
                entry["truncated"] = True
        return orjson.dumps(out).decode()

    # -- helpers -----------------------------------------------------------------------------

    def _fits(self, name: str, arr: np.ndarray, rules: _TensorRules) -> bool:
        """Whether the column rules point inside the tensor's last axis.

        When they do not (a 1-D tensor, fewer columns than the rule expects), the tensor is not
        laid out the way the rule's author knew it, so nobody can tell where its personal data
        sits now: the whole tensor is dropped (fail closed) and this is logged once.
        """
        if not rules.columns:
            return True
        if arr.ndim >= 2 and max(rules.columns) < arr.shape[-1]:
            return True
        key = (name, arr.shape[1:])
        if key not in self._warned and len(self._warned) < _MEMO_LIMIT:
            self._warned.add(key)
            log.warning(
                "audit redaction: tensor '%s' of shape %s has no column %d of its last axis for "
                "the rules %s; its whole payload is dropped",
                name,
                list(arr.shape),
                max(rules.columns),
                dict(rules.label),
            )
        return False

    def _apply(self, action: Action | None, value: object) -> object:
        if action is None:
            return _text(value)
        return None if action == "drop" else self._hash(value)

    def _hash(self, value: object) -> str | None:
        if value is None:
            return None
        assert self._mac is not None  # compiled with a key whenever a rule hashes
        mac = self._mac.copy()
        mac.update(_raw(value))
        return HASH_PREFIX + mac.hexdigest()

    def _keyed(self, arr: np.ndarray) -> bytes:
        assert self._mac is not None
        mac = self._mac.copy()
        _feed(mac, arr)
        return mac.digest()


NO_REDACTION = Redactor()


class AuditRules:
    """Which `Redactor` applies to a request.

    A target with its own rules (a service with an `audit:` section) uses exactly those. Any
    other target uses the default rules whose `target` pattern (fnmatch) matches the name the
    caller used or the model that answered, so a model's defaults also cover services without
    rules of their own that route to it.
    """

    def __init__(
        self,
        own: Mapping[str, Sequence[RedactRule]] | None = None,
        defaults: Sequence[tuple[str, RedactRule]] = (),
        salt: bytes | None = None,
    ) -> None:
        self._salt = salt
        self._own = {name: Redactor(rules, salt) for name, rules in (own or {}).items()}
        self._defaults = list(defaults)
        self._memo: dict[tuple[str, str], Redactor] = {}

    def __bool__(self) -> bool:
        return any(self._own.values()) or bool(self._defaults)

    def for_request(self, target: str, model: str = "") -> Redactor:
        own = self._own.get(target)
        if own is not None:
            return own
        if not self._defaults:
            return NO_REDACTION
        key = (target, model)
        found = self._memo.get(key)
        if found is None:
            names = (target, model) if model and model != target else (target,)
            rules = [
                rule
                for pattern, rule in self._defaults
                if any(fnmatch.fnmatchcase(n, pattern) for n in names)
            ]
            found = Redactor(rules, self._salt) if rules else NO_REDACTION
            if len(self._memo) >= _MEMO_LIMIT:
                self._memo.clear()
            self._memo[key] = found
        return found


def _stricter(current: Action | None, new: Action) -> Action:
    return new if _STRICTNESS[new] > _STRICTNESS[current] else cast(Action, current)


def _text(value: object) -> object:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, (int, float, bool)) or value is None:
        return value
    return str(value)


def _raw(value: object) -> bytes:
    """The bytes a value is hashed as: BYTES as they are, text as UTF-8, numbers as their JSON
    text, so that the same value hashes the same in any tensor (joins across services)."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    try:
        return orjson.dumps(value)
    except TypeError:
        return str(value).encode()


def _feed(h: Any, arr: np.ndarray) -> None:
    """Values of `arr` into the digest `h` (hashlib or hmac): raw bytes, or for object
    (BYTES) tensors each element length-prefixed, so that ["ab", "c"] and ["a", "bc"] differ."""
    if arr.dtype.kind == "O":
        for item in arr.ravel():
            raw = item if isinstance(item, bytes) else str(item).encode()
            h.update(len(raw).to_bytes(8, "little"))
            h.update(raw)
    else:
        h.update(memoryview(arr.tobytes()))
