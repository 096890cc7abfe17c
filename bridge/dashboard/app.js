// Beacon live dashboard: connects to /events (SSE) and shows the messages,
// charts of their numeric fields and the devices' presence. Every text from
// the network goes to the page through textContent.

import { ChartBoard } from './chart.js';
import { DeviceList, PRESENCE_PREFIX } from './devices.js';
import { schedule } from './frame.js';
import { clockTime, dateTime, numericFields, payloadText, splitFilters, storage, topicMatches, truncate, validFilter } from './format.js';
import { Stream } from './stream.js';

const MAX_ROWS = 500;
const MAX_PAYLOAD = 300; // characters shown in the table; more in the tooltip
const MAX_TOOLTIP = 4000;
const MAX_SEEN = 5000; // event ids remembered to drop replayed duplicates
const TOKEN_KEY = 'beacon.token';
const FILTERS_KEY = 'beacon.filters';

const $ = (id) => document.getElementById(id);
const ui = {
  form: $('connect-form'),
  token: $('token'),
  filters: $('filters'),
  button: $('connect'),
  state: $('state'),
  detail: $('detail'),
  identity: $('identity'),
  count: $('count'),
  lastId: $('last-id'),
  notice: $('notice'),
  rows: $('messages').tBodies[0],
  messagesEmpty: $('messages-empty'),
  clear: $('clear'),
};

const charts = new ChartBoard($('charts'), $('charts-empty'), $('charts-note'), $('window'));
const devices = new DeviceList($('devices').tBodies[0], $('devices-note'), $('online-only'));

let stream = null;
let filters = [];
let received = 0;
let lastId = '';
let pending = [];
const seen = new Set();
const charted = new Set(); // ids already charted from the history
let backfill = null; // the history request in flight

/** The subject of a JWT, for display only (the server verifies it). */
function identity(token) {
  if (!token) return 'anonymous';
  try {
    const part = token.split('.')[1].replace(/-/g, '+').replace(/_/g, '/');
    const claims = JSON.parse(atob(part + '='.repeat((4 - (part.length % 4)) % 4)));
    if (claims && typeof claims.sub === 'string' && claims.sub) return claims.sub;
  } catch {
    // not a JWT we can read
  }
  return 'token';
}

function active() {
  return stream !== null && !stream.stopped;
}

function setState(state, detail = '') {
  ui.state.textContent = state === 'error' ? `error: ${detail || 'unknown'}` : state;
  ui.state.dataset.state = state;
  ui.detail.textContent = state === 'error' ? '' : detail;
  ui.button.textContent = active() ? 'Disconnect' : 'Connect';
  ui.button.dataset.action = active() ? 'disconnect' : 'connect';
  document.title = `Beacon live \u00b7 ${state}`;
}

function notice(text, reason = '') {
  ui.notice.textContent = text;
  ui.notice.dataset.reason = reason;
  ui.notice.hidden = !text;
}

function updateStatus() {
  ui.count.textContent = String(received);
  ui.lastId.textContent = lastId;
}

function cell(tr, text, cls) {
  const td = document.createElement('td');
  if (cls) td.className = cls;
  td.textContent = text;
  tr.append(td);
  return td;
}

function row({ env, id, ts }) {
  const tr = document.createElement('tr');
  tr.className = 'msg';
  tr.dataset.topic = env.topic;
  tr.dataset.id = id;
  tr.dataset.retain = String(env.retain === true);
  cell(tr, clockTime(ts), 'time').title = dateTime(ts);
  cell(tr, env.topic, 'topic');
  const text = payloadText(env);
  const decoded = env.decoded && typeof env.decoded === 'object' ? JSON.stringify(env.decoded) : '';
  const td = cell(tr, truncate(decoded || text, MAX_PAYLOAD), 'payload');
  td.dataset.encoding = String(env.encoding || '');
  if (decoded) {
    // The codec's values first, the payload as it came beside them.
    td.dataset.decoded = 'true';
    const raw = document.createElement('span');
    raw.className = 'raw';
    raw.textContent = truncate(text, MAX_PAYLOAD);
    td.append(raw);
  }
  if (text.length > MAX_PAYLOAD) td.title = truncate(text, MAX_TOOLTIP);
  cell(tr, env.qos === undefined ? '' : String(env.qos), 'num');
  cell(tr, env.retain ? 'retained' : '', 'retain');
  return tr;
}

function flushRows() {
  const batch = pending;
  pending = [];
  if (batch.length) {
    const frag = document.createDocumentFragment();
    for (let i = batch.length - 1; i >= 0; i--) frag.append(row(batch[i]));
    ui.rows.prepend(frag);
    while (ui.rows.rows.length > MAX_ROWS) ui.rows.deleteRow(-1);
  }
  ui.messagesEmpty.hidden = ui.rows.rows.length > 0;
  updateStatus();
}

function onMessage(env, id) {
  if (id) {
    if (seen.has(id)) return; // replayed twice
    seen.add(id);
    if (seen.size > MAX_SEEN) seen.delete(seen.values().next().value);
  }
  received++;
  schedule(updateStatus);
  if (env.topic.startsWith(PRESENCE_PREFIX)) devices.presence(env);
  if (!filters.some((f) => topicMatches(f, env.topic))) return; // presence only
  const ts = Number.isFinite(env.ts) ? env.ts : Date.now();
  pending.push({ env, id, ts });
  if (pending.length > MAX_ROWS) pending.splice(0, pending.length - MAX_ROWS);
  schedule(flushRows);
  const fields = env.topic.startsWith(PRESENCE_PREFIX) ? [] : withUnits(env, numericFields(env));
  if (fields.length && !(id && charted.has(id))) charts.add(env.topic, ts, fields);
}

/** Chart names with the unit the codec declares, e.g. "temperature (°C)". */
function withUnits(env, fields) {
  const u = env.units && typeof env.units === 'object' ? env.units : null;
  if (!u) return fields;
  return fields.map(([f, v]) => (typeof u[f] === 'string' && u[f] ? [`${f} (${u[f]})`, v] : [f, v]));
}

const HISTORY_LIMIT = 5000;
const DAY_MS = 24 * 3600 * 1000;

/** Charts start with the past the history holds for the filters (the
 *  chart window, 24 h for "all"); the stream then continues them. */
async function backfillCharts(token) {
  if (backfill) backfill.abort();
  const ctl = new AbortController();
  backfill = ctl;
  const windowMs = Number(document.getElementById('window').value) || DAY_MS;
  const q = filters.map((f) => `topic=${encodeURIComponent(f)}`);
  q.push(`since=${Math.ceil(windowMs / 1000)}s`, `limit=${HISTORY_LIMIT}`);
  try {
    const resp = await fetch(`api/v1/history?${q.join('&')}`, {
      headers: token ? { Authorization: `Bearer ${token}` } : {},
      signal: ctl.signal,
      cache: 'no-store',
    });
    if (!resp.ok) return; // charts then start live, as before
    const body = await resp.json();
    for (const env of Array.isArray(body.messages) ? body.messages : []) {
      if (!env || typeof env.topic !== 'string' || env.topic.startsWith(PRESENCE_PREFIX)) continue;
      const fields = withUnits(env, numericFields(env));
      if (!fields.length || !Number.isFinite(env.ts)) continue;
      if (env.id) {
        charted.add(env.id);
        if (charted.size > HISTORY_LIMIT * 2) charted.delete(charted.values().next().value);
      }
      charts.add(env.topic, env.ts, fields);
    }
  } catch {
    // aborted, or the broker has no history for this reader
  } finally {
    if (backfill === ctl) backfill = null;
  }
}

const RESET_REASONS = {
  unknown: 'the server does not know the last event id',
  expired: 'the missed messages are no longer kept',
  foreign_epoch: 'the server was restarted or replaced',
};

function onReset(data) {
  const reason = typeof data.reason === 'string' ? data.reason : 'unknown';
  const why = Object.hasOwn(RESET_REASONS, reason) ? RESET_REASONS[reason] : reason;
  notice(`Could not replay what was missed (${why}); messages published while disconnected may be missing. The stream continues live.`, reason);
}

function connect() {
  const list = splitFilters(ui.filters.value);
  if (!list.length) list.push('#');
  const bad = list.find((f) => !validFilter(f));
  if (bad !== undefined) {
    ui.filters.setAttribute('aria-invalid', 'true');
    setState('error', `invalid topic filter "${bad}"`);
    return;
  }
  ui.filters.removeAttribute('aria-invalid');
  filters = [...new Set(list)];
  ui.filters.value = filters.join(' ');
  const token = ui.token.value.trim();
  storage.set(TOKEN_KEY, token);
  storage.set(FILTERS_KEY, ui.filters.value);
  ui.identity.textContent = identity(token);

  if (stream) stream.stop();
  seen.clear();
  charted.clear();
  charts.clear();
  backfillCharts(token);
  notice('');
  devices.setNote('presence', '');
  stream = new Stream({
    filters,
    token,
    presence: true,
    onMessage,
    onState: setState,
    onLastId(id) {
      lastId = id;
      schedule(updateStatus);
    },
    onReady() {
      devices.refresh(token);
    },
    onReset,
    onPresenceDenied(why) {
      devices.setNote('presence', `no live presence: this token may not subscribe to ${PRESENCE_PREFIX}# (${why}); ` +
        `a rule allowing subscribe on "${PRESENCE_PREFIX}#" for its subject or role shows the devices (docs/security.md)`);
    },
  });
  stream.start();
}

function disconnect() {
  if (stream) stream.stop();
}

ui.form.addEventListener('submit', (e) => {
  e.preventDefault();
  if (active()) disconnect();
  else connect();
});

ui.clear.addEventListener('click', () => {
  pending = [];
  ui.rows.replaceChildren();
  ui.messagesEmpty.hidden = false;
  charts.clear();
});

ui.notice.addEventListener('click', () => notice(''));

/**
 * The page's query as [name, value] pairs. Unlike URLSearchParams a + stays
 * a + (the MQTT wildcard), and as an unescaped # (?topic=a/#&topic=b) starts
 * the fragment, the fragment is read as more of the query: the page has no
 * other use for it.
 */
function queryParams() {
  const out = [];
  for (const part of (location.search + location.hash).replace(/^[?#]/, '').split('&')) {
    if (!part) continue;
    const i = part.indexOf('=');
    try {
      out.push([decodeURIComponent(i < 0 ? part : part.slice(0, i)), decodeURIComponent(i < 0 ? '' : part.slice(i + 1))]);
    } catch {
      // a malformed escape: skip the parameter
    }
  }
  return out;
}

// Preconfiguration: ?topic=a/%23&topic=b/+/c&token=...&autoconnect=1
const params = queryParams();
const param = (name) => {
  const p = params.filter(([k]) => k === name).pop();
  return p ? p[1] : null;
};
const urlTopics = params.filter(([k]) => k === 'topic').flatMap(([, v]) => splitFilters(v));
const urlToken = param('token');
if (urlToken !== null) {
  ui.token.value = urlToken;
  // Keep the token out of the history and bookmarks.
  const q = params
    .filter(([k]) => k !== 'token')
    .map(([k, v]) => `${encodeURIComponent(k)}=${encodeURIComponent(v).replace(/%2F/g, '/')}`)
    .join('&');
  history.replaceState(history.state, '', `${location.pathname}${q ? `?${q}` : ''}`);
} else {
  ui.token.value = storage.get(TOKEN_KEY) || '';
}
ui.filters.value = urlTopics.length ? urlTopics.join(' ') : storage.get(FILTERS_KEY) || '#';
ui.identity.textContent = identity(ui.token.value.trim());
setState('disconnected');

const auto = param('autoconnect');
if (auto === '1' || auto === 'true') connect();
