// The SSE connection: EventSource on /events, resumed by event id.
//
// The browser reconnects by itself after a dropped connection and sends
// Last-Event-ID; when it gives up (readyState CLOSED, e.g. after an HTTP
// error), the same URL is fetched to read the server's JSON error. Client
// errors (400, 401, 403) stop the stream; anything else is retried with
// exponential backoff, passing last_event_id so the server replays the gap.

export const PRESENCE_FILTER = '$beacon/presence/#';

const BACKOFF_MIN = 1000;
const BACKOFF_MAX = 30000;
const PROBE_TIMEOUT = 10000;

function parse(data) {
  try {
    return JSON.parse(data);
  } catch {
    return null;
  }
}

async function readError(res) {
  let msg = `HTTP ${res.status}`;
  let field = '';
  try {
    const body = await res.json();
    if (body && typeof body.error === 'string' && body.error) msg = body.error;
    if (body && typeof body.field === 'string') field = body.field;
  } catch {
    if (res.statusText) msg += ` ${res.statusText}`;
  }
  return { status: res.status, message: msg, field };
}

export class Stream {
  /**
   * @param {object} o
   * @param {string[]} o.filters topic filters
   * @param {string} o.token JWT, or '' for anonymous
   * @param {boolean} o.presence also subscribe to device presence
   * @param {(env: object, id: string) => void} o.onMessage
   * @param {(state: string, detail?: string) => void} o.onState
   * @param {(lastId: string) => void} o.onLastId
   * @param {(data: object) => void} o.onReady
   * @param {(data: object) => void} o.onReset
   * @param {(message: string) => void} o.onPresenceDenied
   */
  constructor(o) {
    this.o = o;
    this.presence = o.presence;
    this.lastId = '';
    this.es = null;
    this.timer = 0;
    this.attempt = 0;
    this.probe = null;
    this.stopped = true;
  }

  url(resume) {
    const q = new URLSearchParams();
    for (const f of this.o.filters) q.append('topic', f);
    if (this.presence && !this.o.filters.includes(PRESENCE_FILTER)) q.append('topic', PRESENCE_FILTER);
    if (this.o.token) q.set('access_token', this.o.token);
    if (resume && this.lastId) q.set('last_event_id', this.lastId);
    return new URL(`events?${q}`, document.baseURI).href;
  }

  start() {
    this.stopped = false;
    this.attempt = 0;
    this.open(false);
  }

  stop() {
    this.stopped = true;
    this.teardown();
    this.o.onState('disconnected');
  }

  teardown() {
    clearTimeout(this.timer);
    this.timer = 0;
    if (this.probe) this.probe.abort();
    this.probe = null;
    if (this.es) this.es.close();
    this.es = null;
  }

  setLastId(id) {
    if (!id || id === this.lastId) return;
    this.lastId = id;
    this.o.onLastId(id);
  }

  open(resume) {
    this.teardown();
    this.o.onState(resume ? 'reconnecting' : 'connecting');
    const url = this.url(resume);
    const es = new EventSource(url);
    this.es = es;
    const mine = (fn) => (e) => {
      if (this.es === es) fn(e);
    };
    es.addEventListener('message', mine((e) => {
      const env = parse(e.data);
      if (!env || typeof env.topic !== 'string') return;
      const id = e.lastEventId || (typeof env.id === 'string' ? env.id : '');
      this.setLastId(id);
      this.o.onMessage(env, id);
    }));
    es.addEventListener('ready', mine((e) => {
      const data = parse(e.data) || {};
      if (typeof data.last_event_id === 'string') this.setLastId(data.last_event_id);
      this.attempt = 0;
      this.o.onState('live');
      this.o.onReady(data);
    }));
    es.addEventListener('reset', mine((e) => {
      const data = parse(e.data) || {};
      if (typeof data.last_event_id === 'string') this.setLastId(data.last_event_id);
      this.o.onReset(data);
    }));
    es.onerror = mine(() => {
      if (es.readyState === EventSource.CONNECTING) {
        this.o.onState('reconnecting'); // the browser retries with Last-Event-ID
        return;
      }
      es.close();
      this.es = null;
      this.diagnose(url);
    });
  }

  // The browser gave up: fetch the URL to learn why.
  async diagnose(url) {
    this.o.onState('reconnecting');
    const ctl = new AbortController();
    this.probe = ctl;
    const timeout = setTimeout(() => ctl.abort(), PROBE_TIMEOUT);
    let res = null;
    try {
      res = await fetch(url, { headers: { Accept: 'text/event-stream' }, cache: 'no-store', signal: ctl.signal });
    } catch {
      res = null; // network error or timeout
    }
    clearTimeout(timeout);
    if (this.probe !== ctl || this.stopped) {
      ctl.abort();
      return;
    }
    this.probe = null;
    if (!res || res.ok) {
      ctl.abort(); // the stream would open now: drop this copy and retry
      this.retry(res ? '' : 'server unreachable');
      return;
    }
    const err = await readError(res);
    if (this.stopped) return;
    const text = err.field ? `${err.message} (${err.field})` : err.message;
    if (err.status === 429 || err.status >= 500) {
      this.retry(text, Number(res.headers.get('Retry-After')) * 1000 || 0, err.status === 429);
      return;
    }
    if (this.presence && (err.status === 403 || (err.status === 400 && err.field === 'topic'))) {
      // Perhaps only the presence filter is refused: try without it.
      this.presence = false;
      this.o.onPresenceDenied(text);
      this.open(true);
      return;
    }
    this.stopped = true;
    this.o.onState('error', text);
  }

  retry(reason, minDelay = 0, asError = false) {
    const base = Math.min(BACKOFF_MAX, BACKOFF_MIN * 2 ** this.attempt);
    const delay = Math.max(minDelay, Math.round(base * (0.5 + Math.random() / 2)));
    this.attempt++;
    const secs = Math.ceil(delay / 1000);
    const detail = `${reason ? reason + '; ' : ''}retrying in ${secs} s`;
    if (asError) this.o.onState('error', detail);
    else this.o.onState('reconnecting', detail);
    clearTimeout(this.timer);
    this.timer = setTimeout(() => {
      this.timer = 0;
      if (!this.stopped) this.open(true);
    }, delay);
  }
}
