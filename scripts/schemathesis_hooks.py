"""Schemathesis hooks for scripts/schemathesis.

`not_a_server_error` refuses every 5xx, but the contract answers a read whose
`min_position` its read model has not reached within the wait with 503
`PROJECTION_LAGGING` (and `Retry-After`). Random positions are mostly far ahead of the
store, so that answer is expected there: the built-in check is relaxed for it, and only
for it.

schemathesis reuses ids it has seen in answers, so the administrator a run signs in as
would sooner or later deactivate itself or give itself another role, and every later
request would be 401. With `SCHEMATHESIS_PROTECTED_USER_ID` set, user administration
aimed at that user is aimed at an unknown id instead.
"""

import os
import uuid

import schemathesis
from schemathesis.checks import CHECKS

_PROTECTED_USER_ID = os.environ.get("SCHEMATHESIS_PROTECTED_USER_ID")


@schemathesis.hook
def before_call(context, case, kwargs):
    if not _PROTECTED_USER_ID or not case.path.startswith("/api/v1/users/{id}"):
        return
    parameters = case.path_parameters or {}
    if str(parameters.get("id", "")).lower() == _PROTECTED_USER_ID.lower():
        parameters["id"] = str(uuid.uuid4())


def _is_lagging(response, case) -> bool:
    if response.status_code != 503 or "min_position" not in (case.query or {}):
        return False
    try:
        return response.json()["error"]["code"] == "PROJECTION_LAGGING"
    except (ValueError, KeyError, TypeError):
        return False


_builtin = CHECKS.get_one("not_a_server_error")
CHECKS.unregister("not_a_server_error")


@schemathesis.check
def not_a_server_error(ctx, response, case):
    if _is_lagging(response, case):
        return None
    return _builtin(ctx, response, case)
