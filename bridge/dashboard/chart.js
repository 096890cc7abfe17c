// Hand-drawn line charts on <canvas>: one chart per field name, one line
// per topic (beyond MAX_SERIES topics: min, mean and max across them and a
// picked topic), time on the x axis, an auto-scaled y axis. Colours come
// from the --series-N, --chart-* custom properties of style.css.

import { schedule } from './frame.js';

const MAX_POINTS = 300; // per series
const MAX_SERIES = 16; // per chart
const MAX_CHARTS = 24;
const PALETTE = 10;
const DOT_GAP = 8; // px between marked points

const SECOND = 1000;
const MINUTE = 60 * SECOND;
const HOUR = 60 * MINUTE;
const DAY = 24 * HOUR;
const TIME_STEPS = [
  SECOND, 2 * SECOND, 5 * SECOND, 10 * SECOND, 15 * SECOND, 30 * SECOND,
  MINUTE, 2 * MINUTE, 5 * MINUTE, 10 * MINUTE, 15 * MINUTE, 30 * MINUTE,
  HOUR, 2 * HOUR, 3 * HOUR, 6 * HOUR, 12 * HOUR, DAY, 2 * DAY, 7 * DAY,
];

const pad2 = (n) => String(n).padStart(2, '0');

function timeLabel(ms, step) {
  const d = new Date(ms);
  if (step >= DAY) return `${pad2(d.getMonth() + 1)}-${pad2(d.getDate())}`;
  const hm = `${pad2(d.getHours())}:${pad2(d.getMinutes())}`;
  return step >= MINUTE ? hm : `${hm}:${pad2(d.getSeconds())}`;
}

/** A 1, 2 or 5 times a power of ten near range/count. */
function niceStep(range, count) {
  const raw = range / Math.max(1, count);
  const mag = 10 ** Math.floor(Math.log10(raw));
  const n = raw / mag;
  return (n <= 1 ? 1 : n <= 2 ? 2 : n <= 5 ? 5 : 10) * mag;
}

function numLabel(v, step) {
  if (Math.abs(v) < step / 2) v = 0;
  const big = Math.max(Math.abs(v), step);
  if (big >= 1e7 || step < 1e-6) return v.toExponential(2);
  const decimals = Math.max(0, Math.min(8, -Math.floor(Math.log10(step) + 1e-9)));
  return v.toFixed(decimals);
}

function valueText(v) {
  if (Number.isInteger(v)) return String(v);
  const a = Math.abs(v);
  return a >= 1e7 || (a > 0 && a < 1e-3) ? v.toExponential(3) : String(Number(v.toPrecision(6)));
}

/** The first index i with t[i] >= x. */
function lowerBound(t, x) {
  let lo = 0;
  let hi = t.length;
  while (lo < hi) {
    const mid = (lo + hi) >> 1;
    if (t[mid] < x) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

class Series {
  constructor(topic, index) {
    this.topic = topic;
    this.index = index;
    this.t = [];
    this.v = [];
  }

  add(t, v) {
    const n = this.t.length;
    if (n === 0 || t >= this.t[n - 1]) {
      this.t.push(t);
      this.v.push(v);
    } else {
      const i = lowerBound(this.t, t); // late (replayed) point: keep time order
      this.t.splice(i, 0, t);
      this.v.splice(i, 0, v);
    }
    if (this.t.length > MAX_POINTS) {
      this.t.shift();
      this.v.shift();
    }
  }
}

// Beyond MAX_SERIES topics a chart turns into a fleet chart: the minimum,
// mean and maximum across every topic per time bucket, and one topic a
// reader picks drawn over them; no topic is left out.
const MAX_FLEET_TOPICS = 2000; // topics whose own line can be picked; all are aggregated
const FLEET_BUCKETS = MAX_POINTS; // buckets kept; their width doubles to cover the span

class LineChart {
  constructor(field) {
    this.field = field;
    this.series = new Map();
    this.full = false;
    this.fleet = false;
    this.buckets = new Map(); // bucket start (ms) -> {min, max, sum, n}
    this.bucketMs = SECOND;
    this.picked = '';

    this.el = document.createElement('figure');
    this.el.className = 'chart-card';
    const cap = document.createElement('figcaption');
    cap.textContent = field;
    this.canvas = document.createElement('canvas');
    this.canvas.className = 'chart';
    this.canvas.dataset.field = field;
    this.canvas.dataset.points = '0';
    this.canvas.setAttribute('role', 'img');
    this.canvas.setAttribute('aria-label', `${field} over time`);
    this.legend = document.createElement('ul');
    this.legend.className = 'legend';
    this.el.append(cap, this.canvas, this.legend);
  }

  legendItem(label, index, title) {
    const li = document.createElement('li');
    const sw = document.createElement('span');
    sw.className = `swatch s${index % PALETTE}${index >= PALETTE ? ' dashed' : ''}`;
    const name = document.createElement('span');
    name.className = 'legend-topic';
    name.textContent = label;
    if (title) name.title = title;
    const value = document.createElement('span');
    value.className = 'legend-value';
    li.append(sw, name, value);
    this.legend.append(li);
    return value;
  }

  /** Adds a point; false only when a fleet chart holds MAX_FLEET_TOPICS
   *  pickable topics already (the point still counts in the aggregate). */
  add(topic, t, v) {
    let s = this.series.get(topic);
    if (!s) {
      if (!this.fleet && this.series.size >= MAX_SERIES) this.toFleet();
      if (this.fleet && this.series.size >= MAX_FLEET_TOPICS) {
        this.bucket(t, v);
        return true;
      }
      s = new Series(topic, this.series.size);
      this.series.set(topic, s);
      if (this.fleet) this.addOption(topic);
      else s.valueEl = this.legendItem(topic, s.index);
    }
    s.add(t, v);
    if (this.fleet) this.bucket(t, v);
    return true;
  }

  bucket(t, v) {
    let k = Math.floor(t / this.bucketMs) * this.bucketMs;
    let b = this.buckets.get(k);
    if (!b) {
      b = { min: v, max: v, sum: 0, n: 0 };
      this.buckets.set(k, b);
      if (this.buckets.size > FLEET_BUCKETS) this.coarsen();
      k = Math.floor(t / this.bucketMs) * this.bucketMs;
      b = this.buckets.get(k);
    }
    b.min = Math.min(b.min, v);
    b.max = Math.max(b.max, v);
    b.sum += v;
    b.n++;
  }

  /** Doubles the bucket width, merging pairs, so the buckets cover the span. */
  coarsen() {
    const old = this.buckets;
    this.bucketMs *= 2;
    this.buckets = new Map();
    for (const [k, b] of old) {
      const nk = Math.floor(k / this.bucketMs) * this.bucketMs;
      const m = this.buckets.get(nk);
      if (!m) this.buckets.set(nk, { ...b });
      else {
        m.min = Math.min(m.min, b.min);
        m.max = Math.max(m.max, b.max);
        m.sum += b.sum;
        m.n += b.n;
      }
    }
  }

  toFleet() {
    this.fleet = true;
    this.canvas.dataset.mode = 'fleet';
    this.legend.replaceChildren();
    this.aggregate = [new Series('min', 2), new Series('mean', 0), new Series('max', 1)];
    for (const a of this.aggregate) a.valueEl = this.legendItem(a.topic, a.index, `${a.topic} across all topics`);
    const li = document.createElement('li');
    this.count = document.createElement('span');
    this.count.className = 'muted';
    this.pick = document.createElement('select');
    this.pick.className = 'pick';
    this.pick.setAttribute('aria-label', `${this.field}: a topic to draw over the aggregate`);
    const none = document.createElement('option');
    none.value = '';
    none.textContent = 'show one topic\u2026';
    this.pick.append(none);
    this.pick.addEventListener('change', () => {
      this.picked = this.pick.value;
      this.onPick?.();
    });
    this.pickValue = document.createElement('span');
    this.pickValue.className = 'legend-value';
    li.append(this.count, this.pick, this.pickValue);
    this.legend.append(li);
    for (const s of this.series.values()) {
      this.addOption(s.topic);
      for (let i = 0; i < s.t.length; i++) this.bucket(s.t[i], s.v[i]);
    }
  }

  addOption(topic) {
    const o = document.createElement('option');
    o.value = topic;
    o.textContent = topic;
    this.pick.append(o);
  }

  /** The lines to draw: the topics, or the aggregate and the picked one. */
  lines() {
    if (!this.fleet) return [...this.series.values()];
    const [min, mean, max] = this.aggregate;
    for (const a of this.aggregate) {
      a.t = [];
      a.v = [];
    }
    for (const k of [...this.buckets.keys()].sort((a, b) => a - b)) {
      const b = this.buckets.get(k);
      const t = k + this.bucketMs / 2;
      min.t.push(t);
      min.v.push(b.min);
      mean.t.push(t);
      mean.v.push(b.sum / b.n);
      max.t.push(t);
      max.v.push(b.max);
    }
    this.count.textContent = `${this.series.size} topics`;
    this.canvas.dataset.topics = String(this.series.size);
    const out = [...this.aggregate];
    const p = this.picked && this.series.get(this.picked);
    if (p) {
      const line = { topic: p.topic, index: 3, t: p.t, v: p.v, valueEl: this.pickValue };
      out.push(line);
    } else this.pickValue.textContent = '';
    return out;
  }

  draw(theme, windowMs) {
    const lines = this.lines();
    let tMin = Infinity;
    let tMax = -Infinity;
    for (const s of lines) {
      if (!s.t.length) continue;
      tMin = Math.min(tMin, s.t[0]);
      tMax = Math.max(tMax, s.t[s.t.length - 1]);
    }
    // The x axis spans the data, at most the window back from the newest
    // point (the broker's clock, not this browser's).
    if (tMax === -Infinity) tMin = tMax = Date.now();
    if (windowMs > 0) tMin = Math.max(tMin, tMax - windowMs);
    let x0 = tMin;
    let x1 = tMax;
    if (x1 - x0 < SECOND) {
      x0 -= 5 * SECOND;
      x1 += 5 * SECOND;
    }

    // Visible points and the y range.
    let points = 0;
    let lo = Infinity;
    let hi = -Infinity;
    const spans = [];
    for (const s of lines) {
      const from = lowerBound(s.t, tMin);
      spans.push([s, from]);
      points += s.t.length - from;
      for (let i = from; i < s.v.length; i++) {
        if (s.v[i] < lo) lo = s.v[i];
        if (s.v[i] > hi) hi = s.v[i];
      }
      const last = s.v.length ? valueText(s.v[s.v.length - 1]) : '';
      if (s.valueEl.textContent !== last) s.valueEl.textContent = last;
    }
    this.canvas.dataset.points = String(points);
    if (lo === Infinity) {
      lo = 0;
      hi = 1;
    } else if (lo === hi) {
      const d = Math.abs(lo) * 0.1 || 1;
      lo -= d;
      hi += d;
    }

    const c = this.canvas;
    const w = c.clientWidth;
    const h = c.clientHeight;
    if (!w || !h) return; // not laid out (hidden)
    const dpr = window.devicePixelRatio || 1;
    const pw = Math.round(w * dpr);
    const ph = Math.round(h * dpr);
    if (c.width !== pw || c.height !== ph) {
      c.width = pw;
      c.height = ph;
    }
    const ctx = c.getContext('2d');
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, w, h);
    ctx.font = theme.font;
    ctx.textBaseline = 'middle';

    const top = 8;
    const bottom = h - 20;
    const yStep = niceStep(hi - lo, Math.max(2, Math.floor((bottom - top) / 36)));
    const yMin = Math.floor(lo / yStep) * yStep;
    const yMax = Math.ceil(hi / yStep) * yStep;
    const yTicks = [];
    for (let i = 0; i <= 40; i++) {
      const v = yMin + i * yStep; // (a step below the values' precision still ends)
      if (v > yMax + yStep / 2) break;
      yTicks.push(v);
    }
    const yLabels = yTicks.map((v) => numLabel(v, yStep));
    const left = Math.ceil(Math.max(...yLabels.map((l) => ctx.measureText(l).width))) + 10;
    const right = w - 10;
    if (right - left < 20 || bottom - top < 20) return;

    const X = (t) => left + ((t - x0) / (x1 - x0)) * (right - left);
    const Y = (v) => bottom - ((v - yMin) / (yMax - yMin || 1)) * (bottom - top);

    // Grid and y labels.
    ctx.lineWidth = 1;
    ctx.strokeStyle = theme.grid;
    ctx.fillStyle = theme.text;
    ctx.textAlign = 'right';
    ctx.beginPath();
    yTicks.forEach((v, i) => {
      const y = Math.round(Y(v)) + 0.5;
      ctx.moveTo(left, y);
      ctx.lineTo(right, y);
      ctx.fillText(yLabels[i], left - 6, y);
    });
    ctx.stroke();

    // Time ticks, aligned to local wall-clock time.
    const maxTicks = Math.max(2, Math.floor((right - left) / 80));
    const span = x1 - x0;
    const tStep = TIME_STEPS.find((s) => span / s <= maxTicks) || Math.ceil(span / maxTicks / DAY) * DAY;
    const offset = -new Date(x0).getTimezoneOffset() * MINUTE;
    ctx.textAlign = 'center';
    ctx.textBaseline = 'top';
    ctx.beginPath();
    const t0 = Math.ceil((x0 + offset) / tStep) * tStep - offset;
    for (let t = t0; t <= x1 && t < t0 + (maxTicks + 1) * tStep; t += tStep) {
      const x = Math.round(X(t)) + 0.5;
      ctx.moveTo(x, top);
      ctx.lineTo(x, bottom);
      ctx.fillText(timeLabel(t, tStep), x, bottom + 5);
    }
    ctx.stroke();
    ctx.strokeStyle = theme.axis;
    ctx.beginPath();
    ctx.moveTo(left, bottom + 0.5);
    ctx.lineTo(right, bottom + 0.5);
    ctx.stroke();

    // Lines, clipped to the plot; from the last point before the window on.
    ctx.save();
    ctx.beginPath();
    ctx.rect(left, top - 2, right - left + 2, bottom - top + 4);
    ctx.clip();
    ctx.lineWidth = 1.75;
    ctx.lineJoin = 'round';
    for (const [s, from] of spans) {
      const n = s.t.length - from;
      if (n <= 0) continue;
      const color = theme.series[s.index % PALETTE];
      ctx.strokeStyle = color;
      ctx.fillStyle = color;
      ctx.setLineDash(s.index >= PALETTE ? [5, 3] : []);
      ctx.beginPath();
      for (let i = Math.max(0, from - 1); i < s.t.length; i++) {
        const x = X(s.t[i]);
        const y = Y(s.v[i]);
        if (i === Math.max(0, from - 1)) ctx.moveTo(x, y);
        else ctx.lineTo(x, y);
      }
      ctx.stroke();
      // Mark the points while they stand apart, else only the latest.
      const sparse = (X(s.t[s.t.length - 1]) - X(s.t[from])) / n >= DOT_GAP;
      for (let i = sparse ? from : s.t.length - 1; i < s.t.length; i++) {
        ctx.beginPath();
        ctx.arc(X(s.t[i]), Y(s.v[i]), 2.5, 0, 2 * Math.PI);
        ctx.fill();
      }
    }
    ctx.restore();
  }
}

/** All charts, redrawn at most once per frame. */
export class ChartBoard {
  /**
   * @param {HTMLElement} container where the charts go
   * @param {HTMLElement} empty shown while there is no chart
   * @param {HTMLElement} note tells when charts or topics were left out
   * @param {HTMLSelectElement} windowSelect time window in ms, 0 for all
   */
  constructor(container, empty, note, windowSelect) {
    this.container = container;
    this.empty = empty;
    this.note = note;
    this.windowSelect = windowSelect;
    this.charts = new Map();
    this.dirty = new Set();
    this.dropped = new Set();
    this.flush = this.flush.bind(this);
    this.readTheme();

    windowSelect.addEventListener('change', () => this.invalidate());
    matchMedia('(prefers-color-scheme: dark)').addEventListener('change', () => {
      this.readTheme();
      this.invalidate();
    });
    if ('ResizeObserver' in window) new ResizeObserver(() => this.invalidate()).observe(container);
    else window.addEventListener('resize', () => this.invalidate());
  }

  readTheme() {
    const css = getComputedStyle(this.container);
    const v = (name, fallback) => css.getPropertyValue(name).trim() || fallback;
    this.theme = {
      series: Array.from({ length: PALETTE }, (_, i) => v(`--series-${i}`, '#2563eb')),
      grid: v('--chart-grid', 'rgba(128,128,128,0.2)'),
      axis: v('--chart-axis', 'rgba(128,128,128,0.6)'),
      text: v('--chart-text', '#666'),
      font: `11px ${v('--font-ui', 'system-ui, sans-serif')}`,
    };
  }

  invalidate() {
    for (const c of this.charts.values()) this.dirty.add(c);
    schedule(this.flush);
  }

  /**
   * Plots a message's numeric fields.
   * @param {string} topic
   * @param {number} ts unix milliseconds
   * @param {Array<[string, number]>} fields
   */
  add(topic, ts, fields) {
    for (const [field, value] of fields) {
      let chart = this.charts.get(field);
      if (!chart) {
        if (this.charts.size >= MAX_CHARTS) {
          this.drop(`field ${field}`);
          continue;
        }
        chart = new LineChart(field);
        chart.onPick = () => {
          this.dirty.add(chart);
          schedule(this.flush);
        };
        this.charts.set(field, chart);
        this.container.append(chart.el);
        this.empty.hidden = true;
      }
      if (!chart.add(topic, ts, value)) {
        this.drop(`${topic} ${field}`);
        continue;
      }
      this.dirty.add(chart);
    }
    if (this.dirty.size) schedule(this.flush);
  }

  drop(what) {
    if (this.dropped.has(what) || this.dropped.size > 1000) return;
    this.dropped.add(what);
    this.note.textContent = `Not charted (limit of ${MAX_CHARTS} charts): ${this.dropped.size} fields, e.g. ${[...this.dropped].slice(0, 3).join(', ')}`;
    this.note.hidden = false;
  }

  flush() {
    const windowMs = Number(this.windowSelect.value) || 0;
    for (const c of this.dirty) c.draw(this.theme, windowMs);
    this.dirty.clear();
  }

  clear() {
    this.charts.clear();
    this.dirty.clear();
    this.dropped.clear();
    this.container.replaceChildren();
    this.empty.hidden = false;
    this.note.hidden = true;
  }
}
