"""The admin API's seed flows, driven through the Python client generated from the live
/openapi.json (scripts/generated-clients.sh). A call the client cannot express fails at import or
at the call; an answer it cannot parse into its model fails at the call; a status the document
does not list raises `UnexpectedStatus`.

Usage: python flows.py BASE_URL ADMIN_KEY (the package `keygate_admin_client` on PYTHONPATH)
"""

import datetime
import re
import secrets
import sys

from keygate_admin_client import AuthenticatedClient, Client
from keygate_admin_client.api.clients import (
    client_usage,
    create_client,
    delete_client,
    get_client,
    list_clients,
    update_client,
)
from keygate_admin_client.api.keys import (
    change_credits,
    create_key,
    delete_key,
    get_key,
    import_keys,
    key_usage,
    list_keys,
    rotate_key,
    update_key,
)
from keygate_admin_client.api.kixote import (
    kixote_create_client,
    kixote_create_client_key,
    kixote_delete_client,
    kixote_list_clients,
    kixote_revoke_client_key,
    login,
)
from keygate_admin_client.api.service import healthz, readyz
from keygate_admin_client.api.webhooks import create_webhook, delete_webhook, get_webhook, list_webhooks
from keygate_admin_client.models import (
    ClientUsage,
    ClientView,
    CreateClient,
    CreatedClient,
    CreateKey,
    CreateKeyMetadataType0,
    CreateWebhook,
    CreditsBody,
    CreditsChange,
    CreditsView,
    DeletedClient,
    EventName,
    ImportRequest,
    ImportResult,
    Interval,
    KeyView,
    KxClientRef,
    KxCreateClient,
    KxCreated,
    KxDeleted,
    KxRecreated,
    KxRevoked,
    License,
    LoginRequest,
    Problem,
    ProblemCode,
    RateLimit,
    Refill,
    RotateKey,
    SetBy,
    Status,
    TokenResponse,
    UpdateClient,
    UpdateKey,
    UsageView,
    WebhookList,
    WebhookView,
)
from keygate_admin_client.types import Unset

base, admin_key = sys.argv[1], sys.argv[2]
# Admin key in its header, and the same key as a bearer token: both schemes of the document.
admin = AuthenticatedClient(
    base_url=base,
    token=admin_key,
    prefix="",
    auth_header_name="X-ADMIN-KEY",
    raise_on_unexpected_status=True,
)
admin_bearer = AuthenticatedClient(base_url=base, token=admin_key, raise_on_unexpected_status=True)
anonymous = Client(base_url=base, raise_on_unexpected_status=True)
steps = 0


def ok(response, status, model):
    """The answer has `status` and was parsed into `model`."""
    global steps
    steps += 1
    assert response.status_code == status, (status, response.status_code, response.content)
    assert isinstance(response.parsed, model), (model, type(response.parsed), response.content)
    return response.parsed


def problem(response, status, code):
    """The answer is a problem+json with `status` and `code`, parsed into `Problem`."""
    p = ok(response, status, Problem)
    assert p.status == status and p.code == code, (p.status, p.code, p.detail)
    return p


def logs_in(key):
    """True when `key` authenticates (through the generated login call)."""
    r = login.sync_detailed(client=anonymous, body=LoginRequest(api_key=key))
    if r.status_code == 200:
        ok(r, 200, TokenResponse)
        return True
    problem(r, 401, ProblemCode.INVALID_API_KEY)
    return False


def utc(t):
    return t.tzinfo is not None and t.utcoffset() == datetime.timedelta(0)


ok(healthz.sync_detailed(client=anonymous), 200, Status)
ok(readyz.sync_detailed(client=anonymous), 200, Status)

# Without a credential, and with a wrong one: 401 problem+json.
problem(
    list_keys.sync_detailed(client=AuthenticatedClient(base_url=base, token="", prefix="", auth_header_name="X-Nothing")),
    401,
    ProblemCode.UNAUTHORIZED,
)
wrong = AuthenticatedClient(base_url=base, token="wrong-admin-key", prefix="", auth_header_name="X-ADMIN-KEY")
problem(list_keys.sync_detailed(client=wrong), 401, ProblemCode.UNAUTHORIZED)

# --- create a client (with its first key) ---
created = ok(
    create_client.sync_detailed(
        client=admin,
        body=CreateClient(client_id="acme", license_=License.PRO, permissions=["keys:manage", "invoices:read"]),
    ),
    201,
    CreatedClient,
)
assert created.client_id == "acme" and created.license_ == "pro"
first = created.api_key
assert isinstance(first, KeyView) and first.key.startswith("kg_") and first.name == "default"
assert logs_in(first.key)
problem(
    create_client.sync_detailed(client=admin, body=CreateClient(client_id="acme", license_=License.FREE)),
    409,
    ProblemCode.CONFLICT,
)
c = ok(get_client.sync_detailed("acme", client=admin_bearer), 200, ClientView)
assert c.client_id == "acme" and isinstance(c.created_at, datetime.datetime) and utc(c.created_at)

# --- create a key with permissions and an expiry ---
expires = (datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=30)).replace(microsecond=0)
k = ok(
    create_key.sync_detailed(
        client=admin,
        body=CreateKey(
            name="billing backend",
            client_id="acme",
            permissions=["invoices:read", "invoices:write"],
            expires_at=expires,
            metadata=CreateKeyMetadataType0.from_dict({"team": "billing"}),
        ),
    ),
    201,
    KeyView,
)
assert k.permissions == ["invoices:read", "invoices:write"]
assert k.expires_at == expires and k.expires_set_by == SetBy.ADMIN
assert k.metadata.to_dict() == {"team": "billing"}
assert k.key.startswith("kg_") and k.key.startswith(k.prefix)
assert logs_in(k.key)
k_days = ok(
    create_key.sync_detailed(client=admin, body=CreateKey(name="in days", client_id="acme", expires_days=7)),
    201,
    KeyView,
)
assert datetime.timedelta(days=6) < k_days.expires_at - datetime.datetime.now(datetime.timezone.utc) <= datetime.timedelta(days=7)
# What the document refuses, the server refuses: an expiry in the past, an unknown client.
past = datetime.datetime(2001, 1, 1, tzinfo=datetime.timezone.utc)
p = problem(
    create_key.sync_detailed(client=admin, body=CreateKey(name="x", client_id="acme", expires_at=past)),
    422,
    ProblemCode.VALIDATION_FAILED,
)
assert [e.field for e in p.errors] == ["expires_at"]
problem(create_key.sync_detailed(client=admin, body=CreateKey(name="x", client_id="nobody")), 404, ProblemCode.NOT_FOUND)

# --- list with pages ---
for i in range(5):
    ok(create_key.sync_detailed(client=admin, body=CreateKey(name=f"batch {i}", client_id="acme")), 201, KeyView)
total = 1 + 2 + 5
seen = []
for page in (1, 2, 3, 4):
    pg = list_keys.sync_detailed(client=admin, page=page, per_page=3, client_id="acme").parsed
    assert pg.page == page and pg.per_page == 3 and pg.total == total, (pg.page, pg.per_page, pg.total)
    assert len(pg.data) == min(3, max(0, total - (page - 1) * 3))
    for item in pg.data:
        assert isinstance(item.key, Unset), "a listing never shows a secret"
        seen.append(item.id)
assert len(seen) == total == len(set(seen)) and k.id in seen and first.id in seen
problem(list_keys.sync_detailed(client=admin, per_page=5000), 422, ProblemCode.VALIDATION_FAILED)

# --- PATCH ---
u = ok(
    update_key.sync_detailed(
        k.id,
        client=admin,
        body=UpdateKey(name="billing backend v2", enabled=False, rate_limit=RateLimit(per_minute=600, burst=20)),
    ),
    200,
    KeyView,
)
assert u.name == "billing backend v2" and u.enabled is False and u.disabled_by == SetBy.ADMIN
assert u.rate_limit.per_minute == 600 and u.rate_limit.burst == 20 and isinstance(u.rate_limit.per_second, Unset)
assert not logs_in(k.key), "a disabled key stops at once"
u = ok(update_key.sync_detailed(k.id, client=admin, body=UpdateKey(enabled=True, expires_at=None)), 200, KeyView)
assert u.enabled is True and u.expires_at is None and u.name == "billing backend v2"
assert logs_in(k.key)
assert ok(get_key.sync_detailed(k.id, client=admin), 200, KeyView).name == "billing backend v2"

# --- rotate with a grace period, then without ---
r = ok(rotate_key.sync_detailed(k.id, client=admin, body=RotateKey(grace_period_seconds=3600)), 200, KeyView)
assert r.id == k.id and r.key != k.key and isinstance(r.previous_key_valid_until, datetime.datetime)
assert logs_in(r.key) and logs_in(k.key), "both keys work during the grace period"
r2 = ok(rotate_key.sync_detailed(k.id, client=admin, body=RotateKey(grace_period_seconds=0)), 200, KeyView)
assert logs_in(r2.key) and not logs_in(r.key) and not logs_in(k.key)
problem(
    rotate_key.sync_detailed(k.id, client=admin, body=RotateKey(grace_period_seconds=604801)),
    422,
    ProblemCode.VALIDATION_FAILED,
)

# --- usage ---
usage = ok(key_usage.sync_detailed(k.id, client=admin, days=7), 200, UsageView)
assert usage.key_id == k.id

# --- a client principal: a token from /auth/login for a key holding keys:manage ---
token = ok(login.sync_detailed(client=anonymous, body=LoginRequest(api_key=first.key)), 200, TokenResponse)
assert token.token_type == "Bearer" and token.expires_in > 0
me = AuthenticatedClient(base_url=base, token=token.access_token, raise_on_unexpected_status=True)
mine = list_keys.sync_detailed(client=me, per_page=1000).parsed
assert mine.total == total and {i.client_id for i in mine.data} == {"acme"}
own = ok(create_key.sync_detailed(client=me, body=CreateKey(name="own", client_id="acme", permissions=["invoices:read"])), 201, KeyView)
problem(
    create_key.sync_detailed(client=me, body=CreateKey(name="more", client_id="acme", permissions=["admin:all"])),
    403,
    ProblemCode.FORBIDDEN,
)
problem(list_clients.sync_detailed(client=me), 403, ProblemCode.FORBIDDEN)
# The same client principal with its API key in the configured header (`client_key`).
by_key = AuthenticatedClient(base_url=base, token=first.key, prefix="", auth_header_name="x-api-key")
assert list_keys.sync_detailed(client=by_key, per_page=1).parsed.total == total + 1
problem(list_clients.sync_detailed(client=by_key), 403, ProblemCode.FORBIDDEN)
assert isinstance(mine.data[0], KeyView), "a page lists KeyView objects"

# --- delete ---
d = ok(delete_key.sync_detailed(own.id, client=admin), 200, KeyView)
assert d.id == own.id and not logs_in(own.key)
problem(get_key.sync_detailed(own.id, client=admin), 404, ProblemCode.NOT_FOUND)

# --- clients: update, list with pages, delete with its keys ---
cv = ok(update_client.sync_detailed("acme", client=admin, body=UpdateClient(license_=License.FREE)), 200, ClientView)
assert cv.license_ == "free"
ok(create_client.sync_detailed(client=admin, body=CreateClient(client_id="globex", license_=License.PRO)), 201, CreatedClient)
p1 = list_clients.sync_detailed(client=admin, page=1, per_page=1).parsed
p2 = list_clients.sync_detailed(client=admin, page=2, per_page=1).parsed
assert p1.total == p2.total == 2 and p1.data[0].client_id != p2.data[0].client_id
dc = ok(delete_client.sync_detailed("globex", client=admin), 200, DeletedClient)
assert dc.client_id == "globex" and dc.deleted_keys == 1
problem(get_client.sync_detailed("globex", client=admin), 404, ProblemCode.NOT_FOUND)

# --- every Kixote call ---
kx = ok(kixote_create_client.sync_detailed(client=admin, body=KxCreateClient(client_id="kx-1", license_=License.PRO)), 201, KxCreated)
assert kx.client_id == "kx-1" and kx.license_ == "pro" and logs_in(kx.api_key)
problem(
    kixote_create_client.sync_detailed(client=admin, body=KxCreateClient(client_id="kx-1", license_=License.PRO)),
    409,
    ProblemCode.CONFLICT,
)
listed = kixote_list_clients.sync_detailed(client=admin)
assert listed.status_code == 200
by_id = {c.client_id: c for c in listed.parsed}
assert set(by_id) == {"acme", "kx-1"}
assert re.fullmatch(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}", by_id["kx-1"].created_at)
rv = ok(kixote_revoke_client_key.sync_detailed(client=admin, body=KxClientRef(client_id="kx-1")), 200, KxRevoked)
assert rv.message == "Client key revoked" and not logs_in(kx.api_key)
rc = ok(kixote_create_client_key.sync_detailed(client=admin, body=KxClientRef(client_id="kx-1")), 200, KxRecreated)
assert rc.message == "Client key recreated" and logs_in(rc.api_key) and not logs_in(kx.api_key)
dl = ok(kixote_delete_client.sync_detailed(client=admin, body=KxClientRef(client_id="kx-1")), 200, KxDeleted)
assert dl.message == "Client deleted" and dl.client_id == "kx-1" and not logs_in(rc.api_key)
problem(kixote_delete_client.sync_detailed(client=admin, body=KxClientRef(client_id="kx-1")), 404, ProblemCode.NOT_FOUND)

# --- credits: given on create, added, set, changed by PATCH; read on the key and the usage ---
metered = ok(
    create_key.sync_detailed(
        client=admin,
        body=CreateKey(
            name="metered",
            client_id="acme",
            credits_=CreditsBody(remaining=100, refill=Refill(amount=1000, interval=Interval.MONTHLY, day=1)),
        ),
    ),
    201,
    KeyView,
)
assert metered.credits_.remaining == 100 and metered.credits_.refill.amount == 1000
assert isinstance(metered.credits_.next_refill_at, datetime.datetime)
cr = ok(change_credits.sync_detailed(metered.id, client=admin, body=CreditsChange(add=50)), 200, CreditsView)
assert cr.remaining == 150 and cr.refill.interval == Interval.MONTHLY
cr = ok(change_credits.sync_detailed(metered.id, client=admin, body=CreditsChange(set_=7)), 200, CreditsView)
assert cr.remaining == 7
assert ok(get_key.sync_detailed(metered.id, client=admin), 200, KeyView).credits_.remaining == 7
problem(
    change_credits.sync_detailed(metered.id, client=admin, body=CreditsChange(add=10**15 + 1)),
    422,
    ProblemCode.VALIDATION_FAILED,
)
cu = ok(client_usage.sync_detailed("acme", client=admin), 200, ClientUsage)
assert cu.client_id == "acme" and [c.id for c in cu.credits_] == [metered.id] and cu.credits_[0].credits_.remaining == 7
pm = ok(update_key.sync_detailed(metered.id, client=admin, body=UpdateKey(credits_=CreditsBody(remaining=3))), 200, KeyView)
assert pm.credits_.remaining == 3 and pm.credits_.refill is None
assert ok(client_usage.sync_detailed("acme", client=admin), 200, ClientUsage).credits_[0].credits_.remaining == 3

# --- a webhook: created (its secret shown this once), listed and read without it, deleted ---
wh = ok(
    create_webhook.sync_detailed(
        client=admin,
        body=CreateWebhook(url="https://hooks.example.com/keygate", events=[EventName.KEY_CREATED, EventName.KEY_REVOKED]),
    ),
    201,
    WebhookView,
)
assert wh.secret.startswith("whsec_") and wh.source == "api" and wh.events == ["key.created", "key.revoked"]
hooks = ok(list_webhooks.sync_detailed(client=admin), 200, WebhookList)
mine_hooks = [h for h in hooks.data if h.id == wh.id]
assert len(mine_hooks) == 1 and isinstance(mine_hooks[0].secret, Unset), "a listing never shows a secret"
assert isinstance(ok(get_webhook.sync_detailed(wh.id, client=admin), 200, WebhookView).secret, Unset)
ok(delete_webhook.sync_detailed(wh.id, client=admin), 200, WebhookView)
problem(get_webhook.sync_detailed(wh.id, client=admin), 404, ProblemCode.NOT_FOUND)
assert wh.id not in [h.id for h in ok(list_webhooks.sync_detailed(client=admin), 200, WebhookList).data]

# --- import one plaintext key from another system; it then logs in ---
plain = "kong-" + secrets.token_urlsafe(24)
imp = ok(
    import_keys.sync_detailed(client=admin, body=ImportRequest(keys=[{"client_id": "acme", "name": "from kong", "key": plain}])),
    200,
    ImportResult,
)
assert imp.imported == 1 and imp.errors == [], (imp.imported, imp.errors)
assert logs_in(plain)

# Deleting a client takes its keys: the remaining acme keys stop at once.
ok(delete_client.sync_detailed("acme", client=admin), 200, DeletedClient)
assert not logs_in(r2.key) and not logs_in(first.key)

print(f"generated Python client: {steps} answers checked, every seed flow passed")
