"""Schemathesis hooks for keygate's admin API (loaded by scripts/schemathesis.sh).

`filter_failure` drops exactly two kinds of "schema-valid request rejected" (ST202) failures,
and nothing else:

1. The one rule of the API that JSON Schema cannot state: `expires_at` must be in the future
   (the boundary moves with the clock; the field's description says so). Dropped: a 422 whose
   only field error is `expires_at: must be in the future`, for a request whose `expires_at` is
   indeed not in the future.
2. Requests that were not schema-valid at all. The examples and coverage phases build bodies by
   merging property examples, and do not apply `dependentSchemas` (the document's "at most one
   of expires_at / expires_days / never_expire" and "`roles` or `permissions`, not both"). Each
   such claim is checked here with a full JSON Schema 2020-12 validator (formats included)
   against the document itself; only a body that validator refuses is dropped.

Any other failure, or a refused body that the validator accepts, still fails the run.
"""

import datetime
import json
import os

import jsonschema_rs
import schemathesis

_validators = {}


def _body_is_invalid(case):
    """True when the case's JSON body does not satisfy the operation's request body schema."""
    try:
        body_schema = case.operation.definition.raw["requestBody"]["content"]["application/json"]["schema"]
        root = case.operation.schema.raw_schema
    except (AttributeError, KeyError, TypeError):
        return False
    key = case.operation.label
    if key not in _validators:
        schema = dict(body_schema)
        schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
        schema["components"] = root.get("components", {})
        _validators[key] = jsonschema_rs.Draft202012Validator(schema, validate_formats=True)
    return not _validators[key].is_valid(case.body)


def _past(value):
    if not isinstance(value, str):
        return False
    try:
        t = datetime.datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        return False
    if t.tzinfo is None:
        return False
    return t <= datetime.datetime.now(datetime.timezone.utc)


def _dropped(reason, case):
    """Records a dropped failure (in $KEYGATE_ST_DROPPED, when set) so the report can list them."""
    path = os.environ.get("KEYGATE_ST_DROPPED")
    if path:
        with open(path, "a") as f:
            f.write(f"{case.operation.label}: {reason}: {json.dumps(case.body, sort_keys=True)}\n")
    return False


@schemathesis.hook
def filter_failure(context, failure, case, response):
    if getattr(failure, "code", None) != "ST202":
        return True
    if response is None or response.status_code != 422 or not isinstance(case.body, dict):
        return True
    if _body_is_invalid(case):
        return _dropped("not schema-valid (dependentSchemas)", case)
    try:
        errors = response.json().get("errors") or []
    except Exception:
        return True
    only_time_rule = bool(errors) and all(
        e.get("field") == "expires_at" and e.get("message") == "must be in the future" for e in errors
    )
    if only_time_rule and _past(case.body.get("expires_at")):
        return _dropped("expires_at not in the future", case)
    return True
