// keygate console. Speaks only the public admin API. The key typed at sign-in lives in the
// `key` variable below and nowhere else (no cookie, no storage): a reload forgets it.
// Every value is written with textContent (never as HTML).

let key = null;
let admin = false;
let me = null; // a client principal's own client_id
let current = null; // the client shown
let lastSample = null; // [time ms, requests total] for the request rate

const $ = (id) => document.getElementById(id);

function el(tag, text, attrs) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  return e;
}

function button(text, onClick, cls) {
  const b = el('button', text, { type: 'button' });
  if (cls) b.className = cls;
  b.addEventListener('click', onClick);
  return b;
}

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function api(method, path, body) {
  const init = {
    method,
    headers: { Authorization: 'Bearer ' + key, Accept: 'application/json' },
    credentials: 'omit',
    cache: 'no-store',
  };
  if (body !== undefined) {
    init.headers['Content-Type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  const r = await fetch(path, init);
  const text = await r.text();
  let v = null;
  try {
    v = text ? JSON.parse(text) : null;
  } catch (_) {
    v = null;
  }
  if (!r.ok) {
    let msg = (v && v.detail) || r.statusText;
    if (v && Array.isArray(v.errors)) {
      msg += ': ' + v.errors.map((e) => e.field + ' ' + e.message).join('; ');
    }
    throw new ApiError(r.status, msg);
  }
  return v;
}

async function all(path) {
  const sep = path.includes('?') ? '&' : '?';
  let out = [];
  for (let page = 1; ; page++) {
    const v = await api('GET', `${path}${sep}page=${page}&per_page=1000`);
    out = out.concat(v.data);
    if (v.data.length === 0 || out.length >= v.total) return out;
  }
}

function showError(e) {
  $('error').textContent = e ? String(e.message || e) : '';
}

function guard(f) {
  return async (...args) => {
    showError(null);
    try {
      await f(...args);
    } catch (e) {
      showError(e);
    }
  };
}

function show(section) {
  for (const id of ['signin', 'clients', 'client']) $(id).hidden = id !== section;
}

// --- sign in ---------------------------------------------------------------------------

async function signIn() {
  const input = $('signin-key');
  key = input.value.trim();
  input.value = '';
  $('signin-error').textContent = '';
  try {
    await api('GET', '/v1/clients?per_page=1');
    admin = true;
  } catch (e) {
    if (e.status === 403) {
      try {
        const keys = await api('GET', '/v1/api-keys?per_page=1');
        admin = false;
        me = keys.data.length ? keys.data[0].client_id : null;
      } catch (e2) {
        key = null;
        $('signin-error').textContent = 'Refused: ' + e2.message;
        return;
      }
    } else {
      key = null;
      $('signin-error').textContent = 'Refused: ' + e.message;
      return;
    }
  }
  $('nav').hidden = false;
  $('nav-clients').hidden = !admin;
  $('who').textContent = admin ? 'admin' : 'client ' + me;
  $('health').hidden = false;
  health();
  setInterval(health, 5000);
  if (admin) await clients();
  else await openClient(me);
}

function signOut() {
  key = null;
  location.reload();
}

// --- health strip ----------------------------------------------------------------------

function metric(text, name) {
  let sum = 0;
  for (const line of text.split('\n')) {
    if (line.startsWith(name)) {
      const v = Number(line.slice(line.lastIndexOf(' ') + 1));
      if (!Number.isNaN(v)) sum += v;
    }
  }
  return sum;
}

async function health() {
  try {
    const r = await fetch('/readyz', { cache: 'no-store', credentials: 'omit' });
    $('h-ready').textContent = r.ok ? 'ready' : 'not ready';
    $('h-ready').className = r.ok ? '' : 'bad';
    $('h-store').textContent = r.ok ? 'store: reachable' : 'store: unavailable';
    const m = await (await fetch('/metrics', { cache: 'no-store', credentials: 'omit' })).text();
    const hits = metric(m, 'keygate_cache_total{result="hit"}');
    const lookups = metric(m, 'keygate_cache_total{');
    $('h-cache').textContent =
      'cache hit rate: ' + (lookups ? ((100 * hits) / lookups).toFixed(1) + '%' : 'n/a');
    const total = metric(m, 'keygate_requests_total{');
    const now = Date.now();
    if (lastSample) {
      const rate = ((total - lastSample[1]) * 1000) / Math.max(1, now - lastSample[0]);
      $('h-rate').textContent = 'requests: ' + rate.toFixed(1) + '/s';
    } else {
      $('h-rate').textContent = 'requests: measuring…';
    }
    lastSample = [now, total];
  } catch (e) {
    $('h-ready').textContent = 'unreachable';
    $('h-ready').className = 'bad';
  }
}

// --- clients ---------------------------------------------------------------------------

let clientList = [];

async function clients() {
  // A new key not dismissed leaves the page with the view it was made in.
  hideNewKey();
  show('clients');
  clientList = await all('/v1/clients');
  renderClients();
}

function renderClients() {
  const q = $('client-search').value.trim().toLowerCase();
  const body = $('client-table').tBodies[0];
  body.replaceChildren();
  for (const c of clientList) {
    if (q && !c.client_id.toLowerCase().includes(q) && !c.license.toLowerCase().includes(q)) continue;
    const tr = el('tr');
    const open = button(c.client_id, guard(() => openClient(c.client_id)));
    open.className = 'link';
    const td = el('td');
    td.append(open);
    tr.append(td, el('td', c.license), el('td', c.created_at));
    const act = el('td');
    act.append(button('Delete', guard(() => deleteClient(c.client_id)), 'danger'));
    tr.append(act);
    body.append(tr);
  }
}

async function createClient() {
  const id = $('new-client-id').value.trim();
  const license = $('new-client-license').value.trim();
  const v = await api('POST', '/v1/clients', { client_id: id, license });
  $('new-client-id').value = '';
  // The key is shown once: even when the refresh after it fails.
  try {
    await openClient(id);
  } finally {
    showNewKey(v.api_key.key);
  }
}

async function deleteClient(id) {
  if (!confirm(`Delete client ${id} and all its keys? They stop working at once.`)) return;
  await api('DELETE', '/v1/clients/' + encodeURIComponent(id));
  await clients();
}

// --- one client and its keys -----------------------------------------------------------

async function openClient(id) {
  current = id;
  show('client');
  hideNewKey();
  $('client-title').textContent = id;
  // Only an admin sets credits and rate limits; a client principal sees them, and creates keys
  // without them.
  for (const e of [
    'client-license',
    'client-license-go',
    'client-delete',
    'new-key-limit-row',
    'new-key-credits-row',
  ]) {
    $(e).hidden = !admin;
  }
  if (admin) {
    const c = await api('GET', '/v1/clients/' + encodeURIComponent(id));
    $('client-license').value = c.license;
  }
  await renderKeys();
}

async function changeLicense() {
  await api('PATCH', '/v1/clients/' + encodeURIComponent(current), {
    license: $('client-license').value.trim(),
  });
  await openClient(current);
}

async function removeClient() {
  await deleteClient(current);
}

async function renderKeys() {
  const path = admin ? '/v1/api-keys?client_id=' + encodeURIComponent(current) : '/v1/api-keys';
  const keys = await all(path);
  const body = $('key-table').tBodies[0];
  body.replaceChildren();
  for (const k of keys) {
    const tr = el('tr');
    tr.dataset.keyId = k.id;
    tr.append(
      el('td', k.name),
      el('td', k.prefix),
      el('td', k.permissions.join(', ')),
      el('td', k.enabled ? 'yes' : 'no'),
      el('td', k.expires_at || 'never'),
      el('td', k.last_used_at || '—'),
      el('td', creditsText(k.credits)),
    );
    const act = el('td');
    act.append(
      button('Usage', guard(() => keyUsage(k))),
      button('Rotate', guard(() => rotate(k))),
      button(k.enabled ? 'Disable' : 'Enable', guard(() => setEnabled(k, !k.enabled))),
      button('Revoke', guard(() => revoke(k)), 'danger'),
    );
    tr.append(act);
    body.append(tr);
  }
  await clientUsage(keys);
}

// A key's credits as one line: what is left and the refill ('unlimited' without credits).
function creditsText(c) {
  if (!c) return 'unlimited';
  let t = `${c.remaining} left`;
  if (c.refill) {
    const every = c.refill.interval === 'daily' ? 'day' : 'month';
    t += ` (refill to ${c.refill.amount} every ${every}`;
    if (c.next_refill_at) t += `, next ${c.next_refill_at}`;
    t += ')';
  }
  return t;
}

function showNewKey(secret) {
  $('newkey-value').textContent = secret;
  $('newkey').hidden = false;
}

function hideNewKey() {
  $('newkey-value').textContent = '';
  $('newkey').hidden = true;
}

async function copyNewKey() {
  const text = $('newkey-value').textContent;
  try {
    await navigator.clipboard.writeText(text);
    $('newkey-copy').textContent = 'Copied';
  } catch (_) {
    const range = document.createRange();
    range.selectNodeContents($('newkey-value'));
    const sel = window.getSelection();
    sel.removeAllRanges();
    sel.addRange(range);
    $('newkey-copy').textContent = 'Selected: press Ctrl+C';
  }
}

async function createKey() {
  const name = $('new-key-name').value.trim();
  const permissions = $('new-key-perms')
    .value.split(',')
    .map((p) => p.trim())
    .filter((p) => p);
  const body = { client_id: current, name, permissions };
  const days = $('new-key-days').value;
  if (days) body.expires_days = Number(days);
  const rps = $('new-key-rps').value;
  if (rps) body.rate_limit = { per_second: Number(rps), burst: Number($('new-key-burst').value || rps) };
  const credits = $('new-key-credits').value;
  const refill = $('new-key-refill').value;
  const interval = $('new-key-refill-interval').value;
  if (credits !== '' || refill !== '' || interval) {
    if ((refill === '') !== !interval) {
      throw new Error('A refill needs both an amount and an interval.');
    }
    // Credits with only a refill start full.
    body.credits = { remaining: Number(credits !== '' ? credits : refill) };
    if (interval) body.credits.refill = { amount: Number(refill), interval };
  }
  const v = await api('POST', '/v1/api-keys', body);
  for (const f of [
    'new-key-name',
    'new-key-perms',
    'new-key-days',
    'new-key-rps',
    'new-key-burst',
    'new-key-credits',
    'new-key-refill',
    'new-key-refill-interval',
  ]) {
    $(f).value = '';
  }
  try {
    await renderKeys();
  } finally {
    showNewKey(v.key);
  }
}

async function rotate(k) {
  const grace = prompt(`Rotate ${k.name}: seconds the old key keeps working (0–604800)`, '0');
  if (grace === null) return;
  // Only a whole number of seconds: anything else would rotate with no grace at all.
  if (!/^\s*\d+\s*$/.test(grace)) {
    throw new Error('the grace period is a whole number of seconds (0–604800); nothing was rotated');
  }
  const v = await api('POST', `/v1/api-keys/${encodeURIComponent(k.id)}/rotate`, {
    grace_period_seconds: Number(grace),
  });
  try {
    await renderKeys();
  } finally {
    showNewKey(v.key);
  }
}

async function setEnabled(k, enabled) {
  await api('PATCH', '/v1/api-keys/' + encodeURIComponent(k.id), { enabled });
  await renderKeys();
}

async function revoke(k) {
  if (!confirm(`Revoke ${k.name}? It stops working at once and cannot be restored.`)) return;
  await api('DELETE', '/v1/api-keys/' + encodeURIComponent(k.id));
  await renderKeys();
}

// --- usage -----------------------------------------------------------------------------

function chart(target, title, days) {
  const box = $(target);
  box.replaceChildren(el('h3', title));
  if (!days.length) {
    box.append(el('p', 'No requests recorded in the last 30 days.'));
    return;
  }
  const ns = 'http://www.w3.org/2000/svg';
  const w = 24;
  const h = 120;
  const max = Math.max(...days.map((d) => d.requests));
  const svg = document.createElementNS(ns, 'svg');
  svg.setAttribute('width', String(days.length * w + 10));
  svg.setAttribute('height', String(h + 30));
  days.forEach((d, i) => {
    const bh = Math.max(1, Math.round((d.requests / max) * h));
    const r = document.createElementNS(ns, 'rect');
    r.setAttribute('class', 'bar');
    r.setAttribute('x', String(i * w + 5));
    r.setAttribute('y', String(h - bh + 5));
    r.setAttribute('width', String(w - 4));
    r.setAttribute('height', String(bh));
    const tip = document.createElementNS(ns, 'title');
    tip.textContent = `${d.date}: ${d.requests}`;
    r.append(tip);
    const t = document.createElementNS(ns, 'text');
    t.setAttribute('x', String(i * w + 5));
    t.setAttribute('y', String(h + 20));
    t.textContent = d.date.slice(5);
    svg.append(r, t);
  });
  box.append(svg);
}

async function keyUsage(k) {
  const u = await api('GET', `/v1/api-keys/${encodeURIComponent(k.id)}/usage?days=30`);
  chart('key-usage', `Requests per day: ${k.name} (last used ${u.last_used_at || 'never'}, total ${u.total})`, u.days);
  $('key-usage').append(el('p', `Credits: ${creditsText(u.credits || k.credits)}`, { class: 'credits' }));
}

async function clientQuota() {
  const u = await api('GET', `/v1/clients/${encodeURIComponent(current)}/usage`);
  const q = u.quota;
  $('client-quota').textContent = q
    ? `Quota: ${q.remaining} of ${q.requests} requests left this ${q.per} (used ${q.used}, resets ${q.resets_at})`
    : 'Quota: none (the plan sets no quota)';
}

async function clientUsage(keys) {
  await clientQuota();
  const perDay = new Map();
  for (const k of keys) {
    const u = await api('GET', `/v1/api-keys/${encodeURIComponent(k.id)}/usage?days=30`);
    for (const d of u.days) perDay.set(d.date, (perDay.get(d.date) || 0) + d.requests);
  }
  const days = [...perDay.entries()].sort().map(([date, requests]) => ({ date, requests }));
  chart('client-usage', `Requests per day: all keys of ${current}`, days);
}

// --- wiring ----------------------------------------------------------------------------

$('signin-go').addEventListener('click', signIn);
$('signin-key').addEventListener('keydown', (e) => {
  if (e.key === 'Enter') signIn();
});
$('signout').addEventListener('click', signOut);
$('nav-clients').addEventListener('click', (e) => {
  e.preventDefault();
  guard(clients)();
});
$('client-search').addEventListener('input', renderClients);
$('new-client-go').addEventListener('click', guard(createClient));
$('client-license-go').addEventListener('click', guard(changeLicense));
$('client-delete').addEventListener('click', guard(removeClient));
$('new-key-go').addEventListener('click', guard(createKey));
$('newkey-copy').addEventListener('click', copyNewKey);
$('newkey-done').addEventListener('click', hideNewKey);
