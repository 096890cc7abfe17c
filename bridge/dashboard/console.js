// Beacon operator console: rates, clients and retained messages from the
// admin API (/api/v1/stats, /clients, /retained). Every text from the
// network goes to the page through textContent. Destructive actions take
// a second click within a few seconds (no native dialogs).

import { ChartBoard } from './chart.js';
import { DeviceConsole } from './console_devices.js';
import { ago, dateTime, payloadText, storage, truncate, validFilter } from './format.js';

const TOKEN_KEY = 'beacon.admin-token';
const POLL_MS = 2000;
const ARM_MS = 4000;
const MAX_PAYLOAD = 200;

const $ = (id) => document.getElementById(id);
const ui = {
  form: $('auth-form'),
  token: $('token'),
  state: $('state'),
  version: $('version'),
  uptime: $('uptime'),
  notice: $('notice'),
  cards: $('cards'),
  clients: $('clients').tBodies[0],
  clientsEmpty: $('clients-empty'),
  clientsTotal: $('clients-total'),
  search: $('client-search'),
  connectedOnly: $('connected-only'),
  detail: $('client-detail'),
  detailTitle: $('detail-title'),
  detailInfo: $('detail-info'),
  subs: $('subscriptions').tBodies[0],
  retainedForm: $('retained-form'),
  retainedFilter: $('retained-filter'),
  retained: $('retained').tBodies[0],
  retainedEmpty: $('retained-empty'),
  retainedTotal: $('retained-total'),
};

const charts = new ChartBoard($('charts'), $('charts-empty'), $('charts-note'), $('window'));

let token = '';
let timer = null;
let selected = '';

function setState(state, text) {
  ui.state.dataset.state = state;
  ui.state.textContent = text;
  document.title = `Beacon console \u00b7 ${text}`;
}

function notice(text) {
  ui.notice.textContent = text;
  ui.notice.hidden = !text;
}

class APIError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function api(method, path, body) {
  const headers = token ? { Authorization: `Bearer ${token}` } : {};
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  const resp = await fetch(`api/v1/${path}`, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
    cache: 'no-store',
  });
  if (resp.status === 204) return null;
  let out = null;
  try {
    out = await resp.json();
  } catch {
    // not JSON
  }
  if (!resp.ok) throw new APIError(resp.status, (out && out.error) || resp.statusText);
  return out;
}

function failed(err) {
  if (err instanceof APIError && (err.status === 401 || err.status === 403)) {
    stop();
    setState('error', 'not admitted');
    notice(`The admin API refused this token (${err.status}: ${err.message}). The console needs auth.admin_token or a JWT with role admin.`);
    return;
  }
  setState('reconnecting', 'unreachable');
  notice(`The broker did not answer: ${err.message}`);
}

function cell(tr, text, cls) {
  const td = document.createElement('td');
  if (cls) td.className = cls;
  td.textContent = text;
  tr.append(td);
  return td;
}

const count = (n) => (n >= 1e6 ? `${(n / 1e6).toFixed(1)}M` : n >= 1e4 ? `${(n / 1e3).toFixed(1)}k` : String(n));
const rate = (n) => (n >= 100 ? String(Math.round(n)) : n.toFixed(n >= 10 ? 1 : 2));

function bytes(n) {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) {
    n /= 1024;
    i++;
  }
  return `${i ? n.toFixed(1) : n} ${units[i]}`;
}

function duration(s) {
  if (s < 120) return `${Math.floor(s)} s`;
  if (s < 7200) return `${Math.floor(s / 60)} min`;
  if (s < 172800) return `${Math.floor(s / 3600)} h`;
  return `${Math.floor(s / 86400)} d`;
}

// The destructive button waiting for its second click, by key: the
// tables are rebuilt every poll, and the armed state must survive that.
let armedKey = '';
let armedUntil = 0;

/** A button that acts on the second click within ARM_MS. */
function armed(label, confirmLabel, key, action) {
  const b = document.createElement('button');
  b.type = 'button';
  b.className = 'danger';
  b.dataset.action = label.toLowerCase().replace(/[^a-z]+/g, '-');
  const show = () => {
    const on = armedKey === key && Date.now() < armedUntil;
    b.dataset.armed = String(on);
    b.textContent = on ? confirmLabel : label;
  };
  show();
  b.addEventListener('click', async (e) => {
    e.stopPropagation();
    if (!(armedKey === key && Date.now() < armedUntil)) {
      armedKey = key;
      armedUntil = Date.now() + ARM_MS;
      show();
      setTimeout(show, ARM_MS + 50);
      return;
    }
    armedKey = '';
    b.disabled = true;
    try {
      await action();
    } catch (err) {
      failed(err);
    }
    b.disabled = false;
    show();
  });
  return b;
}

const devices = new DeviceConsole(api, armed, failed);

function showStats(st) {
  ui.version.textContent = String(st.version || '');
  ui.uptime.textContent = duration(Number(st.uptime_s) || 0);
  const r1 = (st.rates && st.rates['1s']) || {};
  const r15 = (st.rates && st.rates['15m']) || {};
  const conns = st.connections || {};
  const total = Object.values(conns).reduce((a, b) => a + b, 0);
  const sto = st.storage || {};
  const cards = [
    ['connections', count(total)],
    ['sessions', count(st.sessions || 0)],
    ['subscriptions', count(st.subscriptions || 0)],
    ['retained', count(st.retained || 0)],
    ['queued', count(st.queued || 0)],
    ['in / s', rate(r1.messages_in_per_s || 0)],
    ['out / s', rate(r1.messages_out_per_s || 0)],
    ['dropped / s (15 min)', rate(r15.dropped_per_s || 0), (r15.dropped_per_s || 0) > 0],
    ['storage', bytes(sto.bytes || 0)],
    ['disk free', bytes(sto.free_bytes || 0), sto.space_low === true],
  ];
  const frag = document.createDocumentFragment();
  for (const [name, value, alert] of cards) {
    const div = document.createElement('div');
    div.dataset.card = name;
    div.dataset.alert = String(alert === true);
    const dt = document.createElement('dt');
    dt.textContent = name;
    const dd = document.createElement('dd');
    dd.textContent = value;
    div.append(dt, dd);
    frag.append(div);
  }
  ui.cards.replaceChildren(frag);

  const now = Date.now();
  charts.add('in', now, [['messages per second', r1.messages_in_per_s || 0]]);
  charts.add('out', now, [['messages per second', r1.messages_out_per_s || 0]]);
  for (const [t, n] of Object.entries(conns)) charts.add(t, now, [['connections', n]]);
  const drops = r1.dropped_per_s_by_reason || {};
  charts.add('all', now, [['drops per second', r1.dropped_per_s || 0]]);
  for (const [reason, n] of Object.entries(drops)) if (n > 0) charts.add(reason, now, [['drops per second', n]]);
}

function clientRow(c) {
  const tr = document.createElement('tr');
  tr.className = 'client';
  tr.dataset.id = c.id;
  tr.dataset.connected = String(c.connected === true);
  tr.setAttribute('aria-selected', String(c.id === selected));
  cell(tr, c.id, 'topic');
  cell(tr, [c.username, c.device && c.device !== c.username ? `(${c.device})` : ''].filter(Boolean).join(' '));
  cell(tr, c.connected ? c.remote || '' : 'away');
  cell(tr, c.transport || '');
  cell(tr, c.protocol_version || '');
  const since = c.connected_since ? Date.parse(c.connected_since) : NaN;
  const td = cell(tr, Number.isFinite(since) ? ago(since) : c.expires_at ? `expires ${dateTime(Date.parse(c.expires_at))}` : '', 'time');
  if (Number.isFinite(since)) td.title = dateTime(since);
  cell(tr, String(c.subscriptions), 'num');
  cell(tr, String(c.inflight), 'num');
  cell(tr, String(c.queued), 'num');
  cell(tr, count(c.messages_in), 'num').title = bytes(c.bytes_in);
  cell(tr, count(c.messages_out), 'num').title = bytes(c.bytes_out);
  const actions = cell(tr, '', 'actions');
  const path = `clients/${encodeURIComponent(c.id)}`;
  if (c.connected) actions.append(armed('Kick', 'Confirm kick', `kick:${c.id}`, async () => {
    await api('DELETE', path);
    await refreshClients();
  }));
  actions.append(armed('Discard session', 'Confirm discard', `discard:${c.id}`, async () => {
    await api('DELETE', `${path}?session=true`);
    if (selected === c.id) closeDetail();
    await refreshClients();
  }));
  tr.addEventListener('click', () => openDetail(c.id));
  return tr;
}

async function refreshClients() {
  const q = new URLSearchParams({ limit: '1000' });
  const s = ui.search.value.trim();
  if (s) q.set('q', s);
  if (ui.connectedOnly.checked) q.set('connected', 'true');
  const body = await api('GET', `clients?${q}`);
  const list = Array.isArray(body.clients) ? body.clients : [];
  const frag = document.createDocumentFragment();
  for (const c of list) frag.append(clientRow(c));
  ui.clients.replaceChildren(frag);
  ui.clientsEmpty.hidden = list.length > 0;
  ui.clientsTotal.textContent = body.total > list.length ? `${list.length} of ${body.total}` : `${body.total}`;
}

function closeDetail() {
  selected = '';
  ui.detail.hidden = true;
}

async function openDetail(id) {
  selected = id;
  for (const tr of ui.clients.rows) tr.setAttribute('aria-selected', String(tr.dataset.id === id));
  let body;
  try {
    body = await api('GET', `clients/${encodeURIComponent(id)}`);
  } catch (err) {
    if (err instanceof APIError && err.status === 404) {
      closeDetail();
      return;
    }
    failed(err);
    return;
  }
  const c = body.client || {};
  ui.detailTitle.textContent = c.id || id;
  ui.detailInfo.textContent = [
    c.persistent ? `persistent session, expiry ${duration(c.session_expiry_s || 0)}` : 'session ends with the connection',
    c.clean_start ? 'clean start' : '',
    c.keep_alive_s ? `keep-alive ${c.keep_alive_s} s` : '',
    `${bytes(c.bytes_in || 0)} in, ${bytes(c.bytes_out || 0)} out`,
  ].filter(Boolean).join(' \u00b7 ');
  const frag = document.createDocumentFragment();
  for (const s of body.subscriptions || []) {
    const tr = document.createElement('tr');
    tr.dataset.filter = s.filter;
    cell(tr, s.filter, 'topic');
    cell(tr, s.group || '');
    cell(tr, String(s.qos), 'num');
    cell(tr, [s.no_local ? 'no local' : '', s.retain_as_published ? 'retain as published' : '',
      s.retain_handling ? `retain handling ${s.retain_handling}` : '', s.subscription_id ? `id ${s.subscription_id}` : '']
      .filter(Boolean).join(', '));
    frag.append(tr);
  }
  ui.subs.replaceChildren(frag);
  ui.detail.hidden = false;
}

/** A topic or filter in a URL path, escaped whole (a / too): left as
 *  path segments, an empty level or ".." would be cleaned by the server's
 *  redirect into another topic. */
const pathTopic = (t) => encodeURIComponent(t);

async function refreshRetained() {
  const filter = ui.retainedFilter.value.trim() || '#';
  if (!validFilter(filter)) {
    ui.retainedFilter.setAttribute('aria-invalid', 'true');
    return;
  }
  ui.retainedFilter.removeAttribute('aria-invalid');
  const last = document.getElementById('topic-source').value === 'last';
  let body;
  if (last) {
    // The newest recorded message of each topic under the filter.
    const h = await api('GET', `history?topic=${encodeURIComponent(filter)}&since=24h&limit=10000`);
    const newest = new Map();
    for (const m of Array.isArray(h.messages) ? h.messages : []) newest.set(m.topic, m);
    const messages = [...newest.values()].sort((a, b) => (a.topic < b.topic ? -1 : 1));
    body = { total: messages.length, messages };
  } else {
    body = await api('GET', `retained/${pathTopic(filter)}?limit=1000`);
  }
  const list = Array.isArray(body.messages) ? body.messages : [];
  const frag = document.createDocumentFragment();
  for (const m of list) {
    const tr = document.createElement('tr');
    tr.className = 'retained';
    tr.dataset.topic = m.topic;
    cell(tr, m.topic, 'topic');
    const text = payloadText(m);
    const decoded = m.decoded && typeof m.decoded === 'object' ? JSON.stringify(m.decoded) : '';
    const td = cell(tr, truncate(decoded || text, MAX_PAYLOAD), 'payload');
    td.dataset.encoding = String(m.encoding || '');
    if (decoded) {
      const raw = document.createElement('span');
      raw.className = 'raw';
      raw.textContent = truncate(text, MAX_PAYLOAD);
      td.append(raw);
    }
    cell(tr, String(m.qos), 'num');
    cell(tr, Number.isFinite(m.ts) && m.ts > 0 ? dateTime(m.ts) : '', 'time');
    const actions = cell(tr, '', 'actions');
    if (!last) actions.append(armed('Delete', 'Confirm delete', `delete:${m.topic}`, async () => {
      await api('DELETE', `retained/${pathTopic(m.topic)}`);
      await refreshRetained();
    }));
    frag.append(tr);
  }
  ui.retained.replaceChildren(frag);
  ui.retainedEmpty.hidden = list.length > 0;
  ui.retainedTotal.textContent = String(body.total);
}

async function poll() {
  try {
    showStats(await api('GET', 'stats'));
    await refreshClients();
    if (selected) await openDetail(selected);
    await devices.refresh();
    await devices.poll();
    setState('live', 'live');
    notice('');
  } catch (err) {
    failed(err);
  }
}

function stop() {
  clearInterval(timer);
  timer = null;
}

async function open() {
  token = ui.token.value.trim();
  storage.set(TOKEN_KEY, token);
  stop();
  setState('connecting', 'opening');
  await poll();
  if (ui.state.dataset.state === 'error') return;
  try {
    await refreshRetained();
  } catch (err) {
    failed(err);
  }
  timer = setInterval(poll, POLL_MS);
}

ui.form.addEventListener('submit', (e) => {
  e.preventDefault();
  open();
});
document.getElementById('topic-source').addEventListener('change', () => refreshRetained().catch(failed));
ui.retainedForm.addEventListener('submit', (e) => {
  e.preventDefault();
  refreshRetained().catch(failed);
});
ui.search.addEventListener('input', () => refreshClients().catch(failed));
ui.connectedOnly.addEventListener('change', () => refreshClients().catch(failed));
ui.notice.addEventListener('click', () => notice(''));

// ?token=... opens at once; the token is then kept out of the history.
const params = new URLSearchParams(location.search);
if (params.has('token')) {
  ui.token.value = params.get('token');
  params.delete('token');
  const q = params.toString();
  history.replaceState(history.state, '', `${location.pathname}${q ? `?${q}` : ''}`);
  open();
} else {
  ui.token.value = storage.get(TOKEN_KEY) || '';
  setState('disconnected', 'signed out');
  if (ui.token.value) open();
}
