// The device list: from GET /api/v1/devices, kept live by presence messages
// on $beacon/presence/<device id>.

import { schedule } from './frame.js';
import { ago, dateTime } from './format.js';

export const PRESENCE_PREFIX = '$beacon/presence/';

export class DeviceList {
  /**
   * @param {HTMLTableSectionElement} tbody
   * @param {HTMLElement} note
   * @param {HTMLInputElement} onlineOnly
   */
  constructor(tbody, note, onlineOnly) {
    this.tbody = tbody;
    this.note = note;
    this.onlineOnly = onlineOnly;
    this.devices = new Map(); // id -> {id, name, type, online, enabled, lastSeen (ms), fromApi, presenceAt}
    this.fetchSeq = 0;
    this.fetchStarted = 0;
    this.presenceNote = '';
    this.listNote = '';
    this.render = this.render.bind(this);
    onlineOnly.addEventListener('change', () => schedule(this.render));
    setInterval(() => schedule(this.render), 30000); // keep "x min ago" fresh
  }

  setNote(kind, text) {
    if (kind === 'list') this.listNote = text;
    else this.presenceNote = text;
    const t = [this.listNote, this.presenceNote].filter(Boolean).join(' \u00b7 ');
    this.note.textContent = t;
    this.note.hidden = !t;
  }

  /** Loads the list; a 401 or 403 leaves the devices known from presence. */
  async refresh(token) {
    const seq = ++this.fetchSeq;
    this.fetchStarted = performance.now();
    const headers = { Accept: 'application/json' };
    if (token) headers.Authorization = `Bearer ${token}`;
    let list;
    try {
      const res = await fetch(new URL('api/v1/devices', document.baseURI), { headers, cache: 'no-store' });
      if (seq !== this.fetchSeq) return;
      if (!res.ok) {
        const why = res.status === 401 || res.status === 403 ? '' : ` (HTTP ${res.status})`;
        this.setNote('list', `device list not available${why}`);
        return;
      }
      const body = await res.json();
      list = body && Array.isArray(body.devices) ? body.devices : null;
      if (!list) throw new Error('unexpected answer');
    } catch {
      if (seq === this.fetchSeq) this.setNote('list', 'device list not available');
      return;
    }
    if (seq !== this.fetchSeq) return;
    this.setNote('list', '');
    const ids = new Set();
    for (const d of list) {
      if (!d || typeof d.id !== 'string') continue;
      ids.add(d.id);
      const old = this.devices.get(d.id);
      const seen = Date.parse(d.last_seen);
      const dev = {
        id: d.id,
        name: typeof d.name === 'string' ? d.name : '',
        type: typeof d.type === 'string' ? d.type : '',
        online: d.online === true,
        enabled: d.enabled !== false,
        lastSeen: Number.isFinite(seen) && seen > 0 ? seen : 0,
        fromApi: true,
        presenceAt: old ? old.presenceAt : 0,
      };
      // Presence that arrived while the list was loading is newer.
      if (old && old.presenceAt > this.fetchStarted) {
        dev.online = old.online;
        dev.lastSeen = Math.max(dev.lastSeen, old.lastSeen);
      }
      this.devices.set(d.id, dev);
    }
    for (const [id, dev] of this.devices) {
      if (dev.fromApi && !ids.has(id)) this.devices.delete(id); // removed since
    }
    schedule(this.render);
  }

  /** Applies a message on $beacon/presence/<id>. */
  presence(env) {
    let p = env.payload;
    if (typeof p === 'string') {
      try {
        p = JSON.parse(p);
      } catch {
        return;
      }
    }
    if (!p || typeof p !== 'object' || typeof p.online !== 'boolean') return;
    const id = typeof p.device === 'string' && p.device ? p.device : env.topic.slice(PRESENCE_PREFIX.length);
    if (!id) return;
    const ts = Number.isFinite(p.ts) ? p.ts : Number.isFinite(env.ts) ? env.ts : Date.now();
    let dev = this.devices.get(id);
    if (!dev) {
      dev = { id, name: '', type: '', online: false, enabled: true, lastSeen: 0, fromApi: false, presenceAt: 0 };
      this.devices.set(id, dev);
    }
    dev.online = p.online;
    dev.lastSeen = Math.max(dev.lastSeen, ts);
    dev.presenceAt = performance.now();
    schedule(this.render);
  }

  render() {
    const onlineOnly = this.onlineOnly.checked;
    const now = Date.now();
    const rows = [...this.devices.values()]
      .filter((d) => !onlineOnly || d.online)
      .sort((a, b) => (b.online - a.online) || (a.id < b.id ? -1 : a.id > b.id ? 1 : 0));
    const frag = document.createDocumentFragment();
    for (const d of rows) {
      const tr = document.createElement('tr');
      tr.className = 'device';
      tr.dataset.id = d.id;
      tr.dataset.online = String(d.online);

      const status = document.createElement('td');
      const badge = document.createElement('span');
      badge.className = 'badge';
      badge.dataset.online = String(d.online);
      badge.textContent = d.online ? 'online' : 'offline';
      status.append(badge);
      if (!d.enabled) {
        const off = document.createElement('span');
        off.className = 'badge disabled';
        off.textContent = 'disabled';
        status.append(' ', off);
      }

      const who = document.createElement('td');
      const id = document.createElement('span');
      id.className = 'device-id';
      id.textContent = d.id;
      who.append(id);
      if (d.name && d.name !== d.id) {
        const name = document.createElement('span');
        name.className = 'muted device-name';
        name.textContent = d.name;
        who.append(name);
      }

      const type = document.createElement('td');
      type.textContent = d.type;

      const seen = document.createElement('td');
      seen.className = 'muted';
      if (d.online) seen.textContent = 'now';
      else if (d.lastSeen) seen.textContent = ago(d.lastSeen, now);
      else seen.textContent = 'never';
      if (d.lastSeen) seen.title = dateTime(d.lastSeen);

      tr.append(status, who, type, seen);
      frag.append(tr);
    }
    this.tbody.replaceChildren(frag);
  }
}
