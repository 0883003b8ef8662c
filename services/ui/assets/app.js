// dlb dashboard. Every piece of text from the mesh (ids, errors, event fields, call results)
// reaches the page through textContent or attribute setters, never through HTML parsing.
'use strict';

const MAX_EVENTS = 50;
const HISTORY_MS = 5 * 60 * 1000;
const COLORS = ['#2563eb', '#16a34a', '#d97706', '#9333ea', '#dc2626', '#0891b2', '#4d7c0f', '#db2777'];

const csrfToken = document.querySelector('meta[name="csrf-token"]').content;
const adminRequired = document.querySelector('meta[name="admin-required"]').content === 'yes';

let snapshot = null;
let events = [];
let history = {};
let historyLoaded = false;
let eventsLoaded = false;
let streamUp = false;
let redisWasOk = null;
const pendingActions = new Set();

const $ = (id) => document.getElementById(id);

function el(tag, props, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props || {})) {
    if (key === 'class') node.className = value;
    else if (key === 'text') node.textContent = value;
    else if (key.startsWith('data-')) node.setAttribute(key, value);
    else node[key] = value;
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

// --- formatting -----------------------------------------------------------------------------

function fmtUs(us) {
  if (!us) return '–';
  return us >= 1000 ? (us / 1000).toFixed(us >= 100000 ? 0 : 1) + ' ms' : Math.round(us) + ' µs';
}
function fmtBytes(b) {
  if (!b) return '–';
  if (b >= 1 << 30) return (b / (1 << 30)).toFixed(1) + ' GiB';
  if (b >= 1 << 20) return (b / (1 << 20)).toFixed(1) + ' MiB';
  return Math.round(b / 1024) + ' KiB';
}
function fmtDuration(ms) {
  if (!ms) return '–';
  const s = Math.floor(ms / 1000);
  if (s < 60) return s + ' s';
  if (s < 3600) return Math.floor(s / 60) + ' min ' + (s % 60) + ' s';
  return Math.floor(s / 3600) + ' h ' + Math.floor((s % 3600) / 60) + ' min';
}
function fmtTime(ms) {
  const d = new Date(ms);
  const pad = (n, w) => String(n).padStart(w || 2, '0');
  return `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}.${pad(d.getMilliseconds(), 3)}`;
}
function fmtRate(r) {
  return r >= 100 ? Math.round(r).toLocaleString() : r.toFixed(1);
}
function pillClass(state) {
  switch (state) {
    case 'serving': return 'pill pill-ok';
    case 'starting': case 'draining': case 'connecting': return 'pill pill-wait';
    case 'stopped': case undefined: case null: return 'pill pill-off';
    default: return 'pill pill-bad';
  }
}

// --- requests -------------------------------------------------------------------------------

async function post(path, body) {
  const headers = { 'X-CSRF-Token': csrfToken };
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  const token = $('admin-token').value.trim();
  if (token) headers.Authorization = 'Bearer ' + token;
  const response = await fetch(path, {
    method: 'POST',
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
    credentials: 'same-origin',
  });
  let data = null;
  try { data = await response.json(); } catch (_) { /* not JSON */ }
  if (!response.ok) {
    throw new Error((data && data.error) || `HTTP ${response.status}`);
  }
  return data;
}

async function getJson(path) {
  const response = await fetch(path, { credentials: 'same-origin' });
  let data = null;
  try { data = await response.json(); } catch (_) { /* not JSON */ }
  if (!response.ok) throw new Error((data && data.error) || `HTTP ${response.status}`);
  return data;
}

// --- banners and header ---------------------------------------------------------------------

function renderBanners() {
  const box = $('banners');
  const banners = [];
  if (!streamUp) {
    banners.push(['bad', 'Lost the connection to the dashboard server; reconnecting… (the numbers below are frozen)']);
  }
  if (snapshot) {
    const s = snapshot.sources;
    if (s.gateway.state === 'down') {
      banners.push(['bad', `Gateway at ${s.gateway.addr} is unreachable: ${s.gateway.error || 'no answer'}. Health and traffic are unknown; operations cannot run.`]);
    }
    if (s.control.state === 'down') {
      banners.push(['bad', `Control at ${s.control.addr} is unreachable: ${s.control.error || 'no answer'}. Lifecycle states and buttons are unavailable.`]);
    }
    if (s.redis.state === 'down') {
      banners.push(['bad', `Event log (Redis at ${s.redis.addr}) is unreachable: ${s.redis.error || 'no answer'}. Events are paused; services keep serving and buffer their events.`]);
    }
    if (s.redis.state === 'off') {
      banners.push(['info', 'The event log is off (dlb-ui --redis none): no events to show.']);
    }
  }
  box.replaceChildren(...banners.map(([kind, text]) =>
    el('p', { class: kind === 'info' ? 'banner info' : 'banner', 'data-source': kind, text })));
}

function renderSettings() {
  const g = snapshot && snapshot.gateway;
  if (!g) {
    $('gateway-settings').textContent = 'gateway: no data';
    return;
  }
  // The rows count what each instance answered (its errors: its own failures); the header
  // counts every call the gateway answered, those it answered itself (no instance, bad
  // request) and callers' bad input among the failed: each number says which it is.
  const byInstances = snapshot.instances.reduce((n, i) => n + i.requests, 0);
  $('gateway-settings').textContent =
    `policy ${g.policy} · health probe every ${g.health_interval_ms} ms (timeout ${g.probe_timeout_ms} ms)` +
    ` · in flight ${g.in_flight}/${g.max_in_flight} · ${g.requests.toLocaleString()} calls` +
    ` (${byInstances.toLocaleString()} by the instances below)` +
    ` · ${g.retries.toLocaleString()} retries` +
    ` · ${g.failures.toLocaleString()} failed (any status but OK, callers' bad input included)`;
}

// --- instances ------------------------------------------------------------------------------

// The latest transitions, e.g. "serving 10:02:03 → 4.1 s → draining → 7 ms → stopped".
function trailNode(trail) {
  const shown = trail.slice(-4);
  const span = el('span', { class: 'trail', title: trail.map((t) => `${t.state} at ${fmtTime(t.at_ms)}`).join('\n') });
  shown.forEach((t, i) => {
    if (i > 0) {
      const gap = t.at_ms - shown[i - 1].at_ms;
      span.append(` → ${gap < 1000 ? gap + ' ms' : (gap / 1000).toFixed(1) + ' s'} → `);
    } else {
      span.append(fmtTime(t.at_ms).slice(0, 8) + ' ');
    }
    span.append(el('b', { text: t.state }));
  });
  return span;
}

function actionButtons(instance) {
  if (!snapshot.control_enabled || !instance.state) return [];
  const buttons = [];
  const busy = pendingActions.has(instance.id);
  const add = (action, label, danger) => buttons.push(el('button', {
    type: 'button', class: danger ? 'danger' : '', text: label, disabled: busy,
    'data-action': action, 'data-id': instance.id,
  }));
  switch (instance.state) {
    case 'serving': case 'starting':
      add('stop', 'Stop (drain)'); add('kill', 'Kill', true); break;
    case 'draining':
      add('kill', 'Kill', true); break;
    default:
      add('start', 'Start'); add('remove', 'Remove', true);
  }
  return buttons;
}

const COLUMNS = ['id', 'address', 'state', 'health', 'num requests', 'num rate', 'num p50',
  'num p99', 'num errors', 'num in-flight', 'num cpu', 'num memory', 'num uptime', 'actions'];

// Replaces a cell's content only when what it shows changed, so that buttons under the mouse
// and text being selected survive the updates that come every second.
function setCell(cell, key, build) {
  if (cell.dataset.key === key) return;
  cell.dataset.key = key;
  cell.replaceChildren(...build());
}

function setText(cell, text) {
  if (cell.textContent !== String(text)) cell.textContent = text;
}

function updateRow(row, i) {
  const cells = row.children;
  setText(cells[0], i.id);
  setText(cells[1], i.address);
  const since = i.trail.length ? snapshot.at_ms - i.trail[i.trail.length - 1].at_ms : 0;
  const draining = i.state === 'draining'
    ? `for ${since < 1000 ? '<1 s' : fmtDuration(since)}, ${i.in_flight} in flight` : '';
  setCell(cells[2], JSON.stringify([i.state, draining, i.trail, i.last_error]), () => [
    el('span', { class: pillClass(i.state), text: i.state || 'unknown' }),
    draining ? el('span', { class: 'detail', text: draining }) : null,
    i.trail.length > 1 ? trailNode(i.trail) : null,
    i.last_error ? el('div', { class: 'error-text', text: i.last_error }) : null,
  ].filter(Boolean));
  // Ejected as an outlier: why, and when it is back (the server's clock, as at_ms).
  const back = i.ejection ? Math.max(0, (i.back_at_ms || 0) - snapshot.at_ms) : 0;
  const ejection = i.ejection
    ? `ejected: ${i.ejection}, back in ${back < 1000 ? '<1 s' : fmtDuration(back)}` : '';
  setCell(cells[3], JSON.stringify([i.health, ejection]), () => [
    el('span', { class: pillClass(i.health), text: i.health || 'not in rotation' }),
    ejection ? el('div', { class: 'error-text outlier', text: ejection }) : null,
  ].filter(Boolean));
  setText(cells[4], i.requests.toLocaleString());
  setText(cells[5], fmtRate(i.rate));
  setText(cells[6], fmtUs(i.p50_us));
  setText(cells[7], fmtUs(i.p99_us));
  setText(cells[8], i.errors.toLocaleString());
  setText(cells[9], i.in_flight);
  setText(cells[10], i.pid ? i.cpu_percent.toFixed(1) + ' %' : '–');
  setText(cells[11], i.pid ? fmtBytes(i.rss_bytes) : '–');
  setText(cells[12], i.pid ? fmtDuration(i.uptime_ms) : '–');
  setCell(cells[13], JSON.stringify([snapshot.control_enabled, i.state, pendingActions.has(i.id)]),
    () => actionButtons(i));
}

function renderInstances() {
  const body = $('instances').querySelector('tbody');
  const existing = new Map([...body.children].map((row) => [row.getAttribute('data-id'), row]));
  const rows = snapshot.instances.map((i) => {
    let row = existing.get(i.id);
    if (!row) {
      row = el('tr', { 'data-id': i.id }, ...COLUMNS.map((c) => el('td', { class: c })));
    }
    updateRow(row, i);
    return row;
  });
  // Keep rows in place when the order is unchanged (the usual case).
  const same = rows.length === body.children.length && rows.every((row, n) => body.children[n] === row);
  if (!same) body.replaceChildren(...rows);
  $('instances-empty').hidden = rows.length > 0;
  $('add-instance').hidden = !snapshot.control_enabled;
}

// Calls by method, busiest first; text only (method names come from callers).
function renderMethods() {
  const g = snapshot && snapshot.gateway;
  const methods = g ? [...g.methods].sort((a, b) => b.calls - a.calls || a.method.localeCompare(b.method)) : [];
  const body = $('methods').querySelector('tbody');
  const key = JSON.stringify(methods);
  if (body.dataset.key !== key) {
    body.dataset.key = key;
    body.replaceChildren(...methods.map((m) => el('tr', { 'data-method': m.method },
      el('td', { text: m.method }),
      el('td', { text: m.pool }),
      el('td', { class: 'num', text: m.calls.toLocaleString() }),
      el('td', { class: 'num', text: m.failures.toLocaleString() }),
      el('td', { class: 'num', text: m.messages_in.toLocaleString() }),
      el('td', { class: 'num', text: m.messages_out.toLocaleString() }),
      el('td', { class: 'num', text: fmtUs(m.mean_duration_us) }))));
  }
  $('methods-empty').hidden = methods.length > 0;
}

function setActionStatus(text, bad) {
  const status = $('action-status');
  status.textContent = text;
  status.className = bad ? 'action-status bad' : 'action-status';
}

async function lifecycle(action, id) {
  const verbs = { start: 'Starting', stop: 'Draining and stopping', kill: 'Killing', remove: 'Removing' };
  setActionStatus(`${verbs[action]} ${id}…`);
  pendingActions.add(id);
  if (snapshot) renderInstances();
  try {
    const data = await post(`/api/instances/${encodeURIComponent(id)}/${action}`);
    const state = data.instance ? data.instance.state : 'removed';
    setActionStatus(`${id}: ${state}`);
  } catch (error) {
    setActionStatus(`${action} ${id} failed: ${error.message}`, true);
  } finally {
    pendingActions.delete(id);
    if (snapshot) renderInstances();
  }
}

// --- chart ----------------------------------------------------------------------------------

// A colour per id that stays the same while instances come and go.
const colorIndex = new Map();
function colorOf(id) {
  if (!colorIndex.has(id)) {
    const used = new Set(colorIndex.values());
    let n = 0;
    while (used.has(n) && n < COLORS.length) n++;
    colorIndex.set(id, n % COLORS.length);
  }
  return COLORS[colorIndex.get(id)];
}

let lastRecorded = 0;
function recordRates() {
  if (!snapshot) return;
  // One point per second at most (snapshots also come on lifecycle changes).
  if (snapshot.gateway && snapshot.at_ms - lastRecorded >= 900) {
    lastRecorded = snapshot.at_ms;
    for (const i of snapshot.instances) {
      if (!i.health) continue;
      const points = history[i.id] || (history[i.id] = []);
      points.push({ at_ms: snapshot.at_ms, rate: i.rate });
    }
  }
  const horizon = snapshot.at_ms - HISTORY_MS;
  const known = new Set(snapshot.instances.map((i) => i.id));
  for (const id of Object.keys(history)) {
    history[id] = history[id].filter((p) => p.at_ms >= horizon);
    // A removed instance leaves the chart (a stopped one stays until its line ages out).
    if (history[id].length === 0 || !known.has(id)) delete history[id];
  }
}

// The smallest 1, 2 or 5 times a power of ten that is at least v.
function niceStep(v) {
  const p = Math.pow(10, Math.floor(Math.log10(v)));
  for (const m of [1, 2, 5]) if (v <= m * p) return m * p;
  return 10 * p;
}

function drawChart() {
  const canvas = $('chart');
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth || 640;
  const height = canvas.clientHeight || 200;
  if (canvas.width !== Math.round(width * ratio)) canvas.width = Math.round(width * ratio);
  if (canvas.height !== Math.round(height * ratio)) canvas.height = Math.round(height * ratio);
  const ctx = canvas.getContext('2d');
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, width, height);
  const left = 48, right = 8, top = 8, bottom = 20;
  const now = snapshot ? snapshot.at_ms : Date.now();
  let max = 0;
  for (const points of Object.values(history)) for (const p of points) max = Math.max(max, p.rate);
  const step = niceStep(Math.max(max, 1) / 4);
  max = step * 4;
  ctx.font = '11px system-ui, sans-serif';
  ctx.fillStyle = '#64748b';
  ctx.strokeStyle = '#e2e8f0';
  ctx.lineWidth = 1;
  for (let k = 0; k <= 4; k++) {
    const y = top + (height - top - bottom) * (1 - k / 4);
    ctx.beginPath(); ctx.moveTo(left, y); ctx.lineTo(width - right, y); ctx.stroke();
    ctx.fillText(fmtRate(step * k), 4, y + 4);
  }
  for (let m = 0; m <= 5; m++) {
    const x = left + (width - left - right) * (1 - m / 5);
    ctx.fillText(m === 0 ? 'now' : `-${m} min`, x - 14, height - 5);
  }
  const xOf = (t) => left + (width - left - right) * (1 - (now - t) / HISTORY_MS);
  const yOf = (r) => top + (height - top - bottom) * (1 - r / max);
  const legend = [];
  ctx.save();
  ctx.beginPath();
  ctx.rect(left, top, width - left - right, height - top - bottom);
  ctx.clip();
  for (const id of Object.keys(history).sort()) {
    const points = history[id];
    ctx.strokeStyle = colorOf(id);
    ctx.lineWidth = 2;
    ctx.beginPath();
    points.forEach((p, n) => (n ? ctx.lineTo(xOf(p.at_ms), yOf(p.rate)) : ctx.moveTo(xOf(p.at_ms), yOf(p.rate))));
    ctx.stroke();
    const swatch = el('span', { class: 'swatch' });
    swatch.style.background = colorOf(id);
    const last = points[points.length - 1];
    legend.push(el('span', {}, swatch, `${id} ${fmtRate(last ? last.rate : 0)}/s`));
  }
  ctx.restore();
  if (legend.length === 0) {
    legend.push(el('span', { class: 'muted', text: historyLoaded ? 'No calls in the last five minutes.' : 'Loading throughput…' }));
  }
  $('legend').replaceChildren(...legend);
}

// --- operations form ------------------------------------------------------------------------

function showInputs() {
  const op = $('op').value;
  for (const label of document.querySelectorAll('#call-form [data-for]')) {
    label.hidden = !label.getAttribute('data-for').split(' ').includes(op);
  }
}

function describeResult(op, r) {
  switch (op) {
    case 'prime': return `${r.prime ? 'prime' : 'not prime'} (certainty: ${r.certainty})`;
    case 'palindrome': return r.palindrome ? 'palindrome: yes' : 'palindrome: no';
    case 'reverse': return r.text;
    case 'fib': return `${r.value}${r.value_truncated ? '… (first 10,000 digits shown)' : ''}\n\n${Number(r.digits).toLocaleString()} digits`;
    case 'wc': {
      const lines = [`words ${r.words} · lines ${r.lines} · characters ${r.characters} · bytes ${r.bytes}`];
      for (const w of r.top || []) lines.push(`${w.count}\t${w.word}`);
      return lines.join('\n');
    }
    default: return JSON.stringify(r);
  }
}

async function runCall(event) {
  event.preventDefault();
  const op = $('op').value;
  const body = { op };
  if (op === 'prime') body.input = $('input-number').value.trim();
  else if (op === 'fib') body.input = $('input-n').value.trim();
  else body.input = $('input-text').value;
  if (op === 'palindrome') body.normalize = $('input-normalize').checked;
  if (op === 'wc') {
    const top = Number($('input-top').value || 0);
    if (!Number.isInteger(top) || top < 0) {
      showCall(true, 'Top words must be a whole number of 0 or more.');
      return;
    }
    body.top = top;
  }
  $('run').disabled = true;
  $('run').textContent = 'Running…';
  try {
    const outcome = await post('/api/call', body);
    if (outcome.error) {
      showCall(true, `${outcome.error.code}: ${outcome.error.message}`, outcome);
    } else {
      showCall(false, describeResult(op, outcome.result), outcome);
    }
  } catch (error) {
    showCall(true, error.message);
  } finally {
    $('run').disabled = false;
    $('run').textContent = 'Run';
  }
}

function showCall(failed, text, outcome) {
  $('call-result').hidden = false;
  $('call-result').className = failed ? 'call-result failed' : 'call-result';
  $('result').textContent = text;
  $('result-served-by').textContent = (outcome && outcome.served_by) || '–';
  $('result-attempts').textContent = (outcome && outcome.attempts) || '–';
  $('result-latency').textContent = outcome ? fmtUs(outcome.latency_us) : '–';
  const trace = (outcome && outcome.trace_id) || '';
  $('result-trace').textContent = trace;
  $('result-trace').hidden = !trace;
  $('result-trace-label').hidden = !trace;
}

// --- events ---------------------------------------------------------------------------------

function summary(e) {
  if (e.kind === 'request') {
    const input = e.input ? ` · input "${e.input}"` : '';
    const trace = e.trace_id ? ` · trace ${e.trace_id}` : '';
    return `${e.op} → ${e.backend || '?'} ${e.status} in ${fmtUs(e.latency_us)} · attempts ${e.attempts}${input}${trace}`;
  }
  const fields = Object.entries(e.fields || {}).map(([k, v]) => `${k}=${v}`).join(' ');
  return fields ? `${e.message}: ${fields}` : e.message;
}

function eventNode(e) {
  return el('li', { 'data-kind': e.kind, 'data-ts': String(e.ts_ms) },
    el('span', { class: 'time', text: fmtTime(e.ts_ms), title: e.ts }),
    el('span', { class: 'who', text: `${e.service}/${e.instance}` }),
    el('span', { class: `kind kind-${e.kind}`, text: e.kind }),
    el('span', { class: 'summary', text: summary(e) }));
}

function renderEvents() {
  $('events').replaceChildren(...events.map(eventNode));
  renderEventsEmpty();
}

function renderEventsEmpty() {
  const redis = snapshot ? snapshot.sources.redis.state : 'connecting';
  $('events-empty').textContent = redis === 'down'
    ? 'The event log is unreachable; events appear again when it is back.'
    : eventsLoaded ? 'No events yet.' : 'Loading events…';
  $('events-empty').hidden = $('events').children.length > 0;
}

// Newest first, strictly: events from several services arrive in batches, not in time order.
const newestFirst = (a, b) => b.ts_ms - a.ts_ms;

let eventsRequest = 0;
let arrivedWhileLoading = null;
const eventKey = (e) => `${e.ts_ms}|${e.service}|${e.instance}|${e.message}|${e.request_id || ''}`;

async function loadEvents() {
  const kind = $('event-kind').value;
  const request = ++eventsRequest;
  arrivedWhileLoading = [];
  try {
    const data = await getJson(`/api/events?kind=${encodeURIComponent(kind)}&limit=${MAX_EVENTS}`);
    if (request !== eventsRequest) return;
    // Events that arrived live during the read and are not in it go on top.
    const known = new Set(data.events.map(eventKey));
    const fresh = arrivedWhileLoading.filter((e) => !known.has(eventKey(e)));
    events = [...fresh, ...data.events].sort(newestFirst).slice(0, MAX_EVENTS);
  } catch (_) {
    if (request !== eventsRequest) return;
    // Never show events of another kind under this filter; the banner says why.
    events = [];
  } finally {
    if (request === eventsRequest) {
      arrivedWhileLoading = null;
      eventsLoaded = true;
    }
  }
  renderEvents();
}

function addEvent(e) {
  const kind = $('event-kind').value;
  if (kind !== 'all' && e.kind !== kind) return;
  if (arrivedWhileLoading) {
    arrivedWhileLoading.unshift(e);
    return;
  }
  // Its place by time (nearly always the top).
  let at = 0;
  while (at < events.length && events[at].ts_ms > e.ts_ms) at++;
  if (at >= MAX_EVENTS) return;
  events.splice(at, 0, e);
  events.length = Math.min(events.length, MAX_EVENTS);
  const list = $('events');
  list.insertBefore(eventNode(e), list.children[at] || null);
  while (list.children.length > MAX_EVENTS) list.lastChild.remove();
  renderEventsEmpty();
}

// --- live stream ----------------------------------------------------------------------------

let bootId = null;
function applySnapshot(next) {
  if (bootId && next.boot_id !== bootId) {
    // The dashboard restarted: its CSRF token changed, so load the page again.
    window.location.reload();
    return;
  }
  bootId = next.boot_id;
  snapshot = next;
  const redisOk = next.sources.redis.state === 'ok';
  if (redisOk && redisWasOk === false) loadEvents();
  redisWasOk = redisOk;
  recordRates();
  renderBanners();
  renderSettings();
  renderInstances();
  renderMethods();
  renderEventsEmpty();
  drawChart();
}

let retryDelay = 1000;
function connect() {
  const source = new EventSource('/api/stream');
  source.addEventListener('open', async () => {
    streamUp = true;
    retryDelay = 1000;
    $('conn').textContent = 'live';
    $('conn').className = 'pill pill-ok';
    renderBanners();
    loadEvents();
    try {
      history = await getJson('/api/history');
    } catch (_) { /* the next snapshots rebuild it */ }
    historyLoaded = true;
    recordRates();
    drawChart();
  });
  source.addEventListener('error', () => {
    streamUp = false;
    $('conn').textContent = 'reconnecting…';
    $('conn').className = 'pill pill-bad';
    renderBanners();
    if (source.readyState === EventSource.CLOSED) {
      // The browser gave up (the server answered with an error): try again ourselves.
      setTimeout(connect, retryDelay);
      retryDelay = Math.min(retryDelay * 2, 15000);
    }
  });
  source.addEventListener('snapshot', (m) => applySnapshot(JSON.parse(m.data)));
  source.addEventListener('log', (m) => addEvent(JSON.parse(m.data)));
  source.addEventListener('resync', () => loadEvents());
}

document.addEventListener('DOMContentLoaded', () => {
  $('admin').hidden = !adminRequired;
  $('op').addEventListener('change', showInputs);
  $('call-form').addEventListener('submit', runCall);
  $('event-kind').addEventListener('change', loadEvents);
  $('add-instance').addEventListener('click', async () => {
    const button = $('add-instance');
    button.disabled = true;
    setActionStatus('Adding an instance…');
    try {
      const data = await post('/api/instances');
      setActionStatus(`Added ${data.instance.id} (${data.instance.state})`);
    } catch (error) {
      setActionStatus(`Add failed: ${error.message}`, true);
    } finally {
      button.disabled = false;
    }
  });
  $('instances').addEventListener('click', (event) => {
    const button = event.target.closest('button[data-action]');
    if (!button) return;
    const action = button.getAttribute('data-action');
    const id = button.getAttribute('data-id');
    if ((action === 'kill' || action === 'remove') && !window.confirm(`${action} ${id}?`)) return;
    lifecycle(action, id);
  });
  window.addEventListener('resize', drawChart);
  showInputs();
  connect();
});
