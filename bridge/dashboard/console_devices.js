// The console's devices: the registry with presence, and a device's page
// (latest values, charts from the history then live, disable, rotate,
// remove). Topics are the convention devices/<id>/... .

import { ChartBoard } from './chart.js';
import { ago, dateTime, numericFields, payloadText, truncate } from './format.js';

const $ = (id) => document.getElementById(id);
const HISTORY_LIMIT = 5000;

export class DeviceConsole {
  /**
   * @param {(method: string, path: string, body?: object) => Promise<any>} api
   * @param {(label: string, confirm: string, key: string, action: () => Promise<void>) => HTMLButtonElement} armed
   * @param {(err: Error) => void} failed
   */
  constructor(api, armed, failed) {
    this.api = api;
    this.armed = armed;
    this.failed = failed;
    this.tbody = $('device-list').tBodies[0];
    this.selected = '';
    this.lastTS = 0; // newest message charted for the selected device
    this.charted = new Set();
    this.latest = new Map(); // topic -> envelope
    this.windowSelect = $('device-window');
    this.charts = new ChartBoard($('device-charts'), $('device-charts-empty'), $('device-charts-note'), this.windowSelect);
    this.windowSelect.addEventListener('change', () => this.select(this.selected));
  }

  async refresh() {
    let body;
    try {
      body = await this.api('GET', 'devices');
    } catch (err) {
      $('devices-note').textContent = `The device registry is not available (${err.message}).`;
      $('devices-note').hidden = false;
      return;
    }
    $('devices-note').hidden = true;
    const list = Array.isArray(body.devices) ? body.devices : [];
    list.sort((a, b) => (b.online - a.online) || (a.id < b.id ? -1 : 1));
    const frag = document.createDocumentFragment();
    for (const d of list) frag.append(this.row(d));
    this.tbody.replaceChildren(frag);
    $('devices-total').textContent = String(list.length);
    if (this.selected) {
      const d = list.find((x) => x.id === this.selected);
      if (d) this.header(d);
      else this.close();
    }
  }

  row(d) {
    const tr = document.createElement('tr');
    tr.className = 'device';
    tr.dataset.id = d.id;
    tr.dataset.online = String(d.online === true);
    tr.setAttribute('aria-selected', String(d.id === this.selected));
    const st = document.createElement('td');
    const badge = document.createElement('span');
    badge.className = d.enabled === false ? 'badge disabled' : 'badge';
    badge.dataset.online = String(d.online === true);
    badge.textContent = d.enabled === false ? 'disabled' : d.online ? 'online' : 'offline';
    st.append(badge);
    tr.append(st);
    const id = document.createElement('td');
    id.className = 'device-id';
    id.textContent = d.id;
    if (d.name && d.name !== d.id) {
      const n = document.createElement('span');
      n.className = 'device-name muted';
      n.textContent = d.name;
      id.append(n);
    }
    tr.append(id);
    const td = (text, cls) => {
      const c = document.createElement('td');
      if (cls) c.className = cls;
      c.textContent = text;
      tr.append(c);
      return c;
    };
    td(d.type || '');
    td(Object.entries(d.tags || {}).map(([k, v]) => `${k}=${v}`).join(' '));
    const seen = Date.parse(d.last_seen);
    const s = td(Number.isFinite(seen) && seen > 0 ? ago(seen) : 'never', 'time');
    if (Number.isFinite(seen) && seen > 0) s.title = dateTime(seen);
    tr.addEventListener('click', () => this.select(d.id));
    return tr;
  }

  close() {
    this.selected = '';
    $('device-detail').hidden = true;
  }

  header(d) {
    $('device-title').textContent = d.name && d.name !== d.id ? `${d.id} (${d.name})` : d.id;
    $('device-topic-id').textContent = d.id;
    const seen = Date.parse(d.last_seen);
    $('device-info').textContent = [
      d.enabled === false ? 'disabled' : d.online ? 'online' : 'offline',
      d.type ? `type ${d.type}` : '',
      Number.isFinite(seen) && seen > 0 ? `last seen ${dateTime(seen)}` : 'never seen',
      d.created ? `added ${dateTime(Date.parse(d.created))}` : '',
    ].filter(Boolean).join(' \u00b7 ');
    const path = `devices/${encodeURIComponent(d.id)}`;
    const acts = $('device-actions');
    const enable = document.createElement('button');
    enable.type = 'button';
    enable.className = 'quiet';
    enable.dataset.action = d.enabled === false ? 'enable' : 'disable';
    enable.textContent = d.enabled === false ? 'Enable' : 'Disable';
    enable.addEventListener('click', async () => {
      try {
        await this.api('PATCH', path, { enabled: d.enabled === false });
        await this.refresh();
      } catch (err) {
        this.failed(err);
      }
    });
    acts.replaceChildren(
      enable,
      this.armed('Rotate secret', 'Confirm rotate', `rotate:${d.id}`, async () => {
        const r = await this.api('POST', `${path}/rotate`);
        const box = $('device-secret');
        box.textContent = `New secret for ${d.id} (shown once; its connections were closed): ${r.secret}`;
        box.hidden = false;
      }),
      this.armed('Remove', 'Confirm remove', `remove:${d.id}`, async () => {
        await this.api('DELETE', path);
        this.close();
        await this.refresh();
      }),
    );
  }

  async select(id) {
    if (!id) return;
    const changed = id !== this.selected;
    this.selected = id;
    for (const tr of this.tbody.rows) tr.setAttribute('aria-selected', String(tr.dataset.id === id));
    if (changed) $('device-secret').hidden = true;
    this.charts.clear();
    this.charted.clear();
    this.latest.clear();
    this.lastTS = 0;
    $('device-values').tBodies[0].replaceChildren();
    $('device-detail').hidden = false;
    try {
      const d = await this.api('GET', `devices/${encodeURIComponent(id)}`);
      this.header(d);
    } catch (err) {
      this.failed(err);
      return;
    }
    await this.poll(Number(this.windowSelect.value));
  }

  /** Charts what the history holds since the last point (or the window). */
  async poll(windowMs) {
    const id = this.selected;
    if (!id) return;
    const since = this.lastTS ? new Date(this.lastTS).toISOString() : `${Math.ceil((windowMs || 86400000) / 1000)}s`;
    const q = `topic=${encodeURIComponent(`devices/${id}/#`)}&since=${encodeURIComponent(since)}&limit=${HISTORY_LIMIT}`;
    let body;
    try {
      body = await this.api('GET', `history?${q}`);
    } catch (err) {
      $('device-charts-note').textContent = `No history for this device (${err.message}).`;
      $('device-charts-note').hidden = false;
      return;
    }
    if (id !== this.selected) return;
    for (const env of Array.isArray(body.messages) ? body.messages : []) {
      if (!env || typeof env.topic !== 'string' || (env.id && this.charted.has(env.id))) continue;
      if (env.id) this.charted.add(env.id);
      if (Number.isFinite(env.ts)) this.lastTS = Math.max(this.lastTS, env.ts);
      this.latest.set(env.topic, env);
      const fields = numericFields(env);
      if (fields.length && Number.isFinite(env.ts)) this.charts.add(env.topic.slice(`devices/${id}/`.length) || env.topic, env.ts, fields);
    }
    this.values();
  }

  values() {
    const frag = document.createDocumentFragment();
    for (const env of [...this.latest.values()].sort((a, b) => (a.topic < b.topic ? -1 : 1))) {
      const tr = document.createElement('tr');
      tr.dataset.topic = env.topic;
      const td = (text, cls) => {
        const c = document.createElement('td');
        if (cls) c.className = cls;
        c.textContent = text;
        tr.append(c);
        return c;
      };
      td(env.topic, 'topic');
      const decoded = env.decoded && typeof env.decoded === 'object' ? JSON.stringify(env.decoded) : '';
      td(truncate(decoded || payloadText(env), 200), 'payload');
      td(Number.isFinite(env.ts) ? dateTime(env.ts) : '', 'time');
      frag.append(tr);
    }
    $('device-values').tBodies[0].replaceChildren(frag);
  }
}
