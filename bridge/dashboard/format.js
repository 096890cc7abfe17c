// Pure helpers: topic filters, payload text, numeric fields, times.

/** Splits the filter field: commas or white space separate filters. */
export function splitFilters(text) {
  return String(text).split(/[\s,]+/).filter(Boolean);
}

/** Reports whether f is a valid MQTT topic filter. */
export function validFilter(f) {
  if (!f || f.length > 65535 || f.includes('\u0000')) return false;
  const levels = f.split('/');
  for (let i = 0; i < levels.length; i++) {
    const l = levels[i];
    if (l === '#') {
      if (i !== levels.length - 1) return false;
    } else if (l !== '+' && (l.includes('#') || l.includes('+'))) {
      return false;
    }
  }
  return true;
}

/** MQTT matching: + is one level, # the rest (and the parent level);
 *  wildcards at the first level do not match topics starting with $. */
export function topicMatches(filter, topic) {
  const f = filter.split('/');
  const t = topic.split('/');
  if (topic.startsWith('$') && (f[0] === '#' || f[0] === '+')) return false;
  for (let i = 0; i < f.length; i++) {
    if (f[i] === '#') return true;
    if (i >= t.length) return false;
    if (f[i] !== '+' && f[i] !== t[i]) return false;
  }
  return f.length === t.length;
}

export function truncate(s, n) {
  return s.length > n ? s.slice(0, n - 1) + '\u2026' : s;
}

function base64Bytes(s) {
  const pad = s.endsWith('==') ? 2 : s.endsWith('=') ? 1 : 0;
  return Math.max(0, Math.floor(s.length * 3 / 4) - pad);
}

/** The text shown for an envelope's payload. */
export function payloadText(env) {
  const p = env.payload;
  switch (env.encoding) {
    case 'base64': {
      const s = typeof p === 'string' ? p : '';
      return `base64: ${truncate(s, 48)} (${base64Bytes(s)} bytes)`;
    }
    case 'utf8':
      return typeof p === 'string' ? p : String(p);
    default: {
      const s = JSON.stringify(p);
      return s === undefined ? '' : s;
    }
  }
}

function isObject(v) {
  return v !== null && typeof v === 'object' && !Array.isArray(v);
}

const MAX_FIELDS = 32;
const TIMESTAMP = /^(ts|time|timestamp)$/i; // a time, not a measurement

function collect(obj, prefix, depth, out) {
  for (const [k, v] of Object.entries(obj)) {
    if (out.length >= MAX_FIELDS) return;
    if (TIMESTAMP.test(k)) continue;
    const name = prefix ? `${prefix}.${k}` : k;
    if (typeof v === 'number' && Number.isFinite(v)) out.push([name, v]);
    else if (isObject(v) && depth > 0) collect(v, name, depth - 1, out);
  }
}

/** The numeric fields to chart, as [field, value] pairs: from the decoded
 *  object when the server sent one, else from a JSON object payload (nested
 *  objects as dotted names), or "value" for a bare JSON number. Fields
 *  named ts, time or timestamp are left out. */
export function numericFields(env) {
  const out = [];
  if (isObject(env.decoded)) {
    collect(env.decoded, '', 2, out);
  } else if (env.encoding === 'json' || env.encoding === undefined) {
    if (isObject(env.payload)) collect(env.payload, '', 2, out);
    else if (typeof env.payload === 'number' && Number.isFinite(env.payload)) out.push(['value', env.payload]);
  }
  return out;
}

const pad = (n, w = 2) => String(n).padStart(w, '0');

/** Local wall time with milliseconds, e.g. 14:03:07.123. */
export function clockTime(ms) {
  const d = new Date(ms);
  return `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}.${pad(d.getMilliseconds(), 3)}`;
}

/** Local date and time, e.g. 2024-11-30 10:26:40. */
export function dateTime(ms) {
  const d = new Date(ms);
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
}

/** How long ago, coarse: "12 s ago", "5 min ago", "3 h ago", "2 d ago". */
export function ago(ms, now = Date.now()) {
  const s = Math.max(0, Math.round((now - ms) / 1000));
  if (s < 60) return `${s} s ago`;
  if (s < 3600) return `${Math.floor(s / 60)} min ago`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ago`;
  return `${Math.floor(s / 86400)} d ago`;
}

/** The tab's sessionStorage, or nothing when it is disabled (the fields
 *  then still hold their values). */
export const storage = {
  get(key) {
    try {
      return sessionStorage.getItem(key);
    } catch {
      return null;
    }
  },
  set(key, value) {
    try {
      if (value) sessionStorage.setItem(key, value);
      else sessionStorage.removeItem(key);
    } catch {
      // storage disabled
    }
  },
};
