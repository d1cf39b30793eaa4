// Pylon dashboard: the pages' script.
//
// Plain modern JavaScript (one ES2020 module) with no framework, no dependencies and no build
// step, on purpose: `cargo build` needs no Node toolchain, and what is committed here is
// exactly what the browser runs. The server serves one HTML shell for every page, naming it in
// <body data-page="...">; this module renders that page from the JSON API (the contract is
// the dashboard's api.rs and server.rs) and refreshes it on a timer.
//
// Safety: data reaches the DOM only through textContent and setAttribute (see `el`), never
// innerHTML, so a name from the mesh cannot inject markup. Nothing is fetched from anywhere
// but this server (its Content-Security-Policy is `default-src 'self'`).

// ---------------------------------------------------------------------------------------------
// Constants

/** `pylon edges`' thresholds, as the server wrote them into the shell (its `failing` and
 *  `flags` win where a row has them). */
const FAILING_BELOW = Number(document.body.dataset.failingBelow);
const RETRY_HEAVY_ABOVE = Number(document.body.dataset.retryHeavyAbove);
const DEFAULT_WINDOW = '1m';
const REFRESH_MS = 5000;
const HISTORY_REFRESH_MS = 30000;
const TAP_MAX_ROWS = 500;
const TAP_PARAMS = ['resource', 'to', 'from', 'namespace', 'method', 'path', 'authority'];
const SVG_NS = 'http://www.w3.org/2000/svg';
const FLAG_ICON = { failing: '✖', 'retry-heavy': '↻', ok: '✓' };

// ---------------------------------------------------------------------------------------------
// DOM building (XSS-safe: text nodes and attributes only)

function build(ns, tag, attrs, children) {
  const node = ns ? document.createElementNS(ns, tag) : document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (typeof value === 'function') node.addEventListener(name.replace(/^on/, ''), value);
    else node.setAttribute(name, value === true ? '' : String(value));
  }
  appendAll(node, children);
  return node;
}

function appendAll(parent, children) {
  for (const child of children) {
    if (child === null || child === undefined || child === false) continue;
    if (Array.isArray(child)) appendAll(parent, child);
    else parent.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

/** `el('a', {href: '/x', class: 'y'}, 'text', childNode, [more])`: an HTML element. */
function el(tag, attrs, ...children) {
  return build(null, tag, attrs, children);
}

/** Replaces a node's children (strings, nodes, nested arrays, nulls skipped). */
function fill(node, ...children) {
  node.replaceChildren();
  appendAll(node, children);
  return node;
}

/** The same for SVG elements. */
function svgEl(tag, attrs, ...children) {
  return build(SVG_NS, tag, attrs, children);
}

/** A word with its icon; the icon is hidden from screen readers, the word says it. */
function iconText(icon, text) {
  return [el('span', { class: 'icon', 'aria-hidden': 'true' }, icon), ` ${text}`];
}

// ---------------------------------------------------------------------------------------------
// Formatting (null, undefined and NaN are "-")

const isNum = (v) => typeof v === 'number' && Number.isFinite(v);
/** A ratio as a percentage: pct(0.995) is "99.50%". */
const pct = (ratio, digits = 2) => (isNum(ratio) ? `${(ratio * 100).toFixed(digits)}%` : '-');
/** Milliseconds: "12 ms", "2.5 ms", "0.42 ms". */
const ms = (v) => (isNum(v) ? `${v >= 10 ? Math.round(v) : +v.toFixed(v >= 1 ? 1 : 2)} ms` : '-');
/** Requests per second: "1.5" (two decimals below 0.1, so a trickle is not "0.0"). */
const rps = (v) => (isNum(v) ? v.toFixed(v > 0 && v < 0.1 ? 2 : 1) : '-');
/** Microseconds, shown in milliseconds. */
const us = (v) => (isNum(v) ? ms(v / 1000) : '-');
const count = (v) => (isNum(v) ? Math.round(v).toLocaleString('en-US') : '-');
const plural = (n, one, many) => `${n} ${n === 1 ? one : many}`;
const errorText = (e) => (e && e.message ? e.message : String(e));

function clock(d) {
  const p = (n, w = 2) => String(n).padStart(w, '0');
  return `${p(d.getHours())}:${p(d.getMinutes())}:${p(d.getSeconds())}.${p(d.getMilliseconds(), 3)}`;
}

// ---------------------------------------------------------------------------------------------
// Flags: failing and retry-heavy

const isFailing = (row) => (typeof row.failing === 'boolean' ? row.failing
  : isNum(row.success_rate) && row.success_rate < FAILING_BELOW);
const isRetryHeavy = (row) => (typeof row.retry_heavy === 'boolean' ? row.retry_heavy
  : isNum(row.retry_ratio) && row.retry_ratio > RETRY_HEAVY_ABOVE);

/** A row's or an edge's flags: the server's `flags` when it sends them, else computed. */
function flagsOf(row) {
  if (Array.isArray(row.flags)) return row.flags.map(String);
  const flags = [];
  if (isFailing(row)) flags.push('failing');
  if (isRetryHeavy(row)) flags.push('retry-heavy');
  return flags;
}

function badge(flag) {
  return el('span', { class: `badge badge-${flag}` }, iconText(FLAG_ICON[flag] || '•', flag));
}

/** A table row's class and data-flags for its flags: `row-failing`, `row-retry-heavy`. */
const flagAttrs = (cls, flags) => ({ class: [cls, ...flags.map((f) => `row-${f}`)].join(' '), 'data-flags': flags.join(' ') });

/** The flags' badges, or an "ok" badge when asked for one and there are none. */
function badges(flags, showOk = false) {
  if (flags.length === 0) return showOk ? badge('ok') : null;
  return flags.flatMap((f, i) => (i ? [' ', badge(f)] : [badge(f)]));
}

// ---------------------------------------------------------------------------------------------
// The window (?window=), links and the source

let windowParam = validWindow(new URLSearchParams(location.search).get('window')) || DEFAULT_WINDOW;

function validWindow(w) {
  return w && /^(\d+(\.\d+)?(ms|s|m|h))+$/.test(w) ? w : null;
}
const withWindow = (path) => `${path}${path.includes('?') ? '&' : '?'}window=${encodeURIComponent(windowParam)}`;
/** A link to another page, carrying the window when it is not the default. */
const pageLink = (path) => (windowParam === DEFAULT_WINDOW ? path : withWindow(path));
const workloadHref = (ns, name) => pageLink(`/workloads/${encodeURIComponent(ns)}/${encodeURIComponent(name)}`);

/** Replaces the page's query string (keeping the window), without a reload. */
function setQuery(params) {
  const q = new URLSearchParams(params);
  if (windowParam === DEFAULT_WINDOW) q.delete('window');
  else q.set('window', windowParam);
  const search = q.toString();
  history.replaceState(null, '', `${location.pathname}${search ? `?${search}` : ''}${location.hash}`);
}

/** The server names its source in the shell; the overview's answer keeps it current. */
function setSource(text) {
  const span = document.getElementById('source');
  if (span && text) span.textContent = `Source: ${text}`;
}

/** Points the nav links at the current window and marks the current page's link. */
function updateNav() {
  const page = document.body.dataset.page;
  const current = page === 'workload' ? 'overview' : page;
  for (const a of document.querySelectorAll('nav a')) {
    a.setAttribute('href', pageLink(a.getAttribute('href').split('?')[0]));
    if (a.dataset.nav === current) a.setAttribute('aria-current', page === 'workload' ? 'true' : 'page');
    else a.removeAttribute('aria-current');
  }
}

function initShell() {
  updateNav();
  const select = document.getElementById('window');
  if (select) {
    if (![...select.options].some((o) => o.value === windowParam)) {
      select.append(el('option', { value: windowParam }, windowParam));
    }
    select.value = windowParam;
    select.addEventListener('change', () => {
      windowParam = validWindow(select.value) || DEFAULT_WINDOW;
      setQuery(new URLSearchParams(location.search));
      updateNav();
      for (const p of pollers) if (p.windowed) p.now();
    });
  }
}

// ---------------------------------------------------------------------------------------------
// Alerts and the API

const alerts = new Map();

/** Shows (or, with no message, clears) the alert for `key` in the #alert box. */
function setAlert(key, message) {
  if (message) alerts.set(key, String(message));
  else alerts.delete(key);
  const box = document.getElementById('alert');
  if (!box) return;
  const text = [...alerts.values()].join('\n');
  if (box.dataset.text === text) return; // unchanged: do not announce it again
  box.dataset.text = text;
  fill(box, ...[...alerts.values()].map((m) => el('p', {}, m)));
  box.hidden = alerts.size === 0;
}

/** GETs JSON from this server: the object, or null after showing the server's error. */
async function api(path) {
  const key = path.split('?')[0];
  let response;
  let body;
  try {
    response = await fetch(path, { headers: { Accept: 'application/json' }, cache: 'no-store' });
    body = await response.json().catch(() => null);
  } catch (e) {
    setAlert(key, `Cannot reach the dashboard server: ${errorText(e)}`);
    return null;
  }
  if (!response.ok || !body || typeof body !== 'object') {
    setAlert(key, typeof body?.error === 'string' ? body.error : `${key}: HTTP ${response.status} ${response.statusText}`.trim());
    return null;
  }
  setAlert(key, null);
  return body;
}

// ---------------------------------------------------------------------------------------------
// Refresh: a timer per data set, paused while the tab is hidden

const pollers = [];

/** Runs `fn` now and every `intervalMs` while the tab is visible; `now()` runs it at once. */
function poll(fn, intervalMs, windowed) {
  let [timer, busy, again] = [0, false, false];
  const now = async () => {
    clearTimeout(timer);
    if (busy) {
      again = true; // runs again when the current run ends
      return;
    }
    if (document.hidden) return; // resumed by visibilitychange
    busy = true;
    try {
      await fn();
      setAlert('script', null);
    } catch (e) {
      setAlert('script', `The page failed to draw: ${errorText(e)}`);
    }
    busy = false;
    if (again) {
      again = false;
      now();
    } else if (!document.hidden) timer = setTimeout(now, intervalMs);
  };
  pollers.push({ now, windowed });
  now();
}

document.addEventListener('visibilitychange', () => {
  if (!document.hidden) for (const p of pollers) p.now();
});

/** Re-renders with `render`, then puts focus back on the element with the same data-focus. */
function keepFocus(render) {
  const active = document.activeElement;
  const holder = active && active.closest ? active.closest('[data-focus]') : null;
  const key = holder ? holder.getAttribute('data-focus') : null;
  render();
  if (key && !holder.isConnected) {
    const again = [...document.querySelectorAll('[data-focus]')].find((n) => n.getAttribute('data-focus') === key);
    if (again) again.focus({ preventScroll: true });
  }
}

// ---------------------------------------------------------------------------------------------
// Tables

const sortState = new Map();

function compareValues(a, b) {
  if (typeof a === 'number' && typeof b === 'number') return a - b;
  return String(a).localeCompare(String(b), 'en', { numeric: true });
}

/**
 * A table whose headers sort it: columns are {key, label, value(row), format(value), render(row),
 * num, sortable}; `key` names the sort kept across refreshes. Returns a scrolling wrapper.
 */
function sortableTable(columns, rows, { key, caption, id, sort, empty = 'No data in the window', rowAttrs } = {}) {
  if (!sortState.has(key) && sort) sortState.set(key, { ...sort });
  const valueOf = (col, row) => (col.value ? col.value(row) : row[col.key]);
  const tbody = el('tbody');
  const headers = columns.map((col) => {
    const th = el('th', { scope: 'col', class: col.num ? 'num' : null });
    if (col.sortable === false) return fill(th, col.label);
    const onclick = () => {
      const s = sortState.get(key);
      sortState.set(key, { col: col.key, dir: s && s.col === col.key && s.dir === 'asc' ? 'desc' : 'asc' });
      draw();
    };
    th.append(el('button', { type: 'button', class: 'sort', 'data-focus': `sort:${key}:${col.key}`, onclick },
      col.label, el('span', { class: 'sort-icon', 'aria-hidden': 'true' })));
    return th;
  });
  const draw = () => {
    const s = sortState.get(key);
    columns.forEach((col, i) => {
      const on = s && s.col === col.key;
      if (on) headers[i].setAttribute('aria-sort', s.dir === 'asc' ? 'ascending' : 'descending');
      else headers[i].removeAttribute('aria-sort');
      const icon = headers[i].querySelector('.sort-icon');
      if (icon) icon.textContent = !on ? '↕' : s.dir === 'asc' ? '▲' : '▼';
    });
    let sorted = rows;
    const col = s && columns.find((c) => c.key === s.col);
    if (col) {
      const sign = s.dir === 'asc' ? 1 : -1;
      const miss = (v) => v === null || v === undefined || Number.isNaN(v);
      sorted = [...rows].sort((a, b) => {
        const [va, vb] = [valueOf(col, a), valueOf(col, b)];
        return miss(va) || miss(vb) ? miss(va) - miss(vb) : sign * compareValues(va, vb); // no data last
      });
    }
    fill(tbody, ...(sorted.length === 0
      ? [el('tr', { class: 'empty' }, el('td', { colspan: columns.length }, empty))]
      : sorted.map((row) => el('tr', rowAttrs ? rowAttrs(row) : {}, ...columns.map((c, i) => {
        const v = valueOf(c, row);
        const content = c.render ? c.render(row) : c.format ? c.format(v) : v ?? '-';
        return el(i === 0 ? 'th' : 'td', { scope: i === 0 ? 'row' : null, class: c.num ? 'num' : null }, content);
      })))));
  };
  draw();
  return el('div', { class: 'table-wrap' }, el('table', { id, class: 'data', 'data-table': key },
    caption ? el('caption', {}, caption) : null, el('thead', {}, el('tr', {}, ...headers)), tbody));
}

// Column helpers shared by the pages.
const colPct = (key, label) => ({ key, label, format: (v) => pct(v), num: true });
const colMs = (key, label) => ({ key, label, format: ms, num: true });
const colRps = { key: 'rps', label: 'RPS', format: rps, num: true };
const colRequests = { key: 'requests', label: 'REQUESTS', format: count, num: true };
const latencyCols = [colMs('latency_ms_p50', 'P50'), colMs('latency_ms_p95', 'P95'), colMs('latency_ms_p99', 'P99')];

// ---------------------------------------------------------------------------------------------
// Sparklines

/**
 * An inline SVG line of `field` over `points` (oldest first; null values leave gaps), labelled
 * with the latest value: a <figure> with the value as text beside the drawing.
 */
function sparkline(points, field, { label, format = String, min, max } = {}) {
  const [W, H, PAD] = [240, 48, 4];
  const values = (points || []).map((p) => (p && isNum(p[field]) ? p[field] : null));
  const known = values.filter((v) => v !== null);
  const last = values.length ? values[values.length - 1] : null;
  const minutes = Math.max(values.length, 1);
  let description = `${label}, last ${minutes} minutes: now ${format(last)}`;
  if (known.length) description += `, lowest ${format(Math.min(...known))}, highest ${format(Math.max(...known))}`;
  else description = `${label}, last ${minutes} minutes: no traffic`;
  const drawing = svgEl('svg', {
    class: 'sparkline', viewBox: `0 0 ${W} ${H}`, width: W, height: H, role: 'img', 'aria-label': description,
  }, svgEl('title', {}, description));
  if (known.length) {
    let lo = isNum(min) ? min : Math.min(...known);
    let hi = isNum(max) ? Math.max(max, ...known) : Math.max(...known);
    if (!(hi > lo)) [lo, hi] = [lo - (Math.abs(hi) * 0.1 || 1), hi + (Math.abs(hi) * 0.1 || 1)];
    const x = (i) => PAD + (values.length === 1 ? (W - 2 * PAD) / 2 : (i * (W - 2 * PAD)) / (values.length - 1));
    const y = (v) => H - PAD - ((v - lo) / (hi - lo)) * (H - 2 * PAD);
    let d = '';
    let run = 0;
    values.forEach((v, i) => {
      if (v === null) {
        run = 0;
        return;
      }
      d += `${run++ === 0 ? 'M' : 'L'}${x(i).toFixed(1)} ${y(v).toFixed(1)} `;
      if (run === 1 && (values[i + 1] ?? null) === null) { // a lone minute: a dot, not an invisible line
        drawing.append(svgEl('circle', { class: 'spark-point', cx: x(i).toFixed(1), cy: y(v).toFixed(1), r: 1.8 }));
      }
    });
    drawing.append(svgEl('path', { class: 'spark-line', d: d.trim() }));
    const li = values.length - 1 - [...values].reverse().findIndex((v) => v !== null);
    drawing.append(svgEl('circle', { class: 'spark-last', cx: x(li).toFixed(1), cy: y(values[li]).toFixed(1), r: 2.6 }));
  } else {
    drawing.append(svgEl('text', { class: 'spark-empty', x: W / 2, y: H / 2 + 4, 'text-anchor': 'middle' }, 'no traffic'));
  }
  return el('figure', { class: 'spark', 'data-field': field },
    el('figcaption', {}, el('span', { class: 'spark-label' }, label), ' ',
      el('strong', { class: 'spark-value' }, format(last))),
    drawing);
}

// ---------------------------------------------------------------------------------------------
// Page: overview (/)

function renderOverview(main) {
  const summary = el('p', { class: 'summary', id: 'overview-summary' }, 'Loading…');
  const nsBox = el('section', { class: 'block', id: 'namespaces' });
  const wlBox = el('section', { class: 'block', id: 'workloads' });
  main.append(el('h1', {}, 'Workloads'), summary, nsBox, wlBox);

  poll(async () => {
    const data = await api(withWindow('/api/overview'));
    if (!data) return;
    setSource(data.source);
    const namespaces = Array.isArray(data.namespaces) ? data.namespaces : [];
    const workloads = Array.isArray(data.workloads) ? data.workloads : [];
    const failing = workloads.filter(isFailing).length;
    const heavy = workloads.filter(isRetryHeavy).length;
    fill(summary,
      `${plural(workloads.length, 'workload', 'workloads')} in ${plural(namespaces.length, 'namespace', 'namespaces')}, last ${windowParam}`,
      failing ? [' · ', badge('failing'), ` ${failing}`] : null,
      heavy ? [' · ', badge('retry-heavy'), ` ${heavy}`] : null,
      !failing && !heavy && workloads.length ? [' · ', badge('ok')] : null,
    );
    keepFocus(() => {
      fill(nsBox, sortableTable([
        { key: 'name', label: 'NAMESPACE' },
        { key: 'workloads', label: 'WORKLOADS', format: count, num: true },
        { key: 'meshed', label: 'MESHED', format: count, num: true },
        colPct('success_rate', 'SUCCESS'),
        colRps,
        colRequests,
      ], namespaces, {
        key: 'namespaces', caption: 'Namespaces', sort: { col: 'name', dir: 'asc' },
        empty: 'No namespaces: no proxy reports to this source',
        rowAttrs: (n) => ({ 'data-namespace': n.name }),
      }));
      fill(wlBox, sortableTable([
        { key: 'namespace', label: 'NAMESPACE' },
        {
          key: 'name',
          label: 'NAME',
          render: (w) => [el('a', { href: workloadHref(w.namespace, w.name), 'data-focus': `wl:${w.namespace}/${w.name}` }, w.name),
            flagsOf(w).length ? [' ', badges(flagsOf(w))] : null],
        },
        { key: 'meshed', label: 'MESHED', format: count, num: true },
        colPct('success_rate', 'SUCCESS'),
        colRps,
        ...latencyCols,
        colPct('retry_ratio', 'RETRY%'),
        { key: 'tcp_conn', label: 'TCP', format: count, num: true },
      ], workloads, {
        key: 'workloads', caption: 'Workloads', sort: { col: 'namespace', dir: 'asc' },
        empty: 'No meshed workloads report to this source',
        rowAttrs: (w) => ({ ...flagAttrs('workload-row', flagsOf(w)), 'data-namespace': w.namespace, 'data-name': w.name }),
      }));
    });
  }, REFRESH_MS, true);
}

// ---------------------------------------------------------------------------------------------
// Page: one workload (/workloads/NS/NAME)

function edgeTable(edges, inbound, key) {
  const peer = (e) => (inbound ? { ns: e.src_namespace, name: e.src, kind: 'deployment' } : { ns: e.dst_namespace, name: e.dst, kind: e.dst_kind || 'deployment' });
  return sortableTable([
    {
      key: 'peer', label: inbound ? 'FROM' : 'TO', value: (e) => peer(e).name,
      render: (e) => {
        const p = peer(e);
        if (p.kind !== 'deployment') return [p.name ?? '-', ' ', el('span', { class: 'muted' }, `(${p.kind})`)];
        return el('a', { href: workloadHref(p.ns, p.name), 'data-focus': `${key}:${p.ns}/${p.name}` }, p.name ?? '-');
      },
    },
    { key: 'namespace', label: 'NAMESPACE', value: (e) => peer(e).ns },
    colPct('success_rate', 'SUCCESS'),
    colRps,
    colRequests,
    colPct('retry_ratio', 'RETRY%'),
    {
      key: 'secured', label: 'MTLS', value: (e) => (typeof e.secured === 'boolean' ? Number(e.secured) : null),
      render: (e) => (typeof e.secured !== 'boolean' ? '-'
        : el('span', { title: (e.server_ids || []).join(', ') || null }, iconText(e.secured ? '✓' : '✖', e.secured ? 'yes' : 'no'))),
    },
    { key: 'flags', label: 'FLAGS', value: (e) => flagsOf(e).join(' '), render: (e) => badges(flagsOf(e), true) },
    {
      key: 'tap', label: 'TAP', sortable: false,
      render: (e) => (e.tap ? el('a', { class: 'tap-link', href: `/tap?${e.tap}`, 'aria-label': `tap requests from ${e.src} to ${e.dst}` }, 'tap') : '-'),
    },
  ], edges, {
    key, caption: inbound ? 'Inbound: who calls it' : 'Outbound: whom it calls', sort: { col: 'peer', dir: 'asc' },
    empty: inbound ? 'No meshed caller in the window' : 'No calls out in the window',
    rowAttrs: (e) => ({ ...flagAttrs('edge-row', flagsOf(e)), 'data-src': e.src, 'data-dst': e.dst }),
  });
}

function statItem(label, value, field) {
  return el('div', { class: 'stat' }, el('dt', {}, label), el('dd', { 'data-stat': field }, value));
}

function renderWorkload(main) {
  const parts = location.pathname.split('/').filter(Boolean);
  let ns = '';
  let name = '';
  try {
    ns = decodeURIComponent(parts[1] || '');
    name = decodeURIComponent(parts[2] || '');
  } catch {
    // A malformed path: shown as not found below.
  }
  if (parts[0] !== 'workloads' || !ns || !name) {
    main.append(el('h1', {}, 'Workload'), el('p', {}, 'A workload page is /workloads/NAMESPACE/NAME.'));
    return;
  }
  const flagsLine = el('p', { class: 'flags', id: 'workload-flags' });
  const stats = el('dl', { class: 'stats', id: 'workload-stats' });
  const sparks = el('div', { class: 'sparks' }, el('p', { class: 'muted' }, 'Loading…'));
  const boxes = Object.fromEntries(['inbound', 'outbound', 'routes', 'pods'].map((id) => [id, el('section', { class: 'block', id })]));
  main.append(
    el('h1', {}, name),
    el('p', { class: 'subtitle' }, 'deployment in namespace ', el('strong', {}, ns), ' · ', el('a', { href: `/tap?${new URLSearchParams({ resource: `deployment/${name}`, namespace: ns })}` }, 'tap its requests')),
    flagsLine, stats,
    el('section', { class: 'block', id: 'history', 'aria-labelledby': 'history-title' },
      el('h2', { id: 'history-title' }, 'Last 15 minutes'), sparks),
    boxes.inbound, boxes.outbound, boxes.routes, boxes.pods);
  const base = `/api/workload/${encodeURIComponent(ns)}/${encodeURIComponent(name)}`;

  poll(async () => {
    const data = await api(withWindow(base));
    if (!data || !data.workload) {
      if (!stats.hasChildNodes()) stats.append(statItem('Status', 'no data', 'status'));
      return;
    }
    const w = data.workload;
    const flags = flagsOf(w);
    fill(flagsLine, flags.length ? badges(flags) : isNum(w.success_rate) ? badge('ok') : el('span', { class: 'muted' }, 'No requests received in the window'));
    fill(stats, ...[['Success', pct, 'success_rate'], ['RPS', rps, 'rps'], ['Requests', count, 'requests'],
      ['P50', ms, 'latency_ms_p50'], ['P95', ms, 'latency_ms_p95'], ['P99', ms, 'latency_ms_p99'],
      ['Retries (sent)', pct, 'retry_ratio'], ['Meshed pods', count, 'meshed'], ['TCP connections', count, 'tcp_conn'],
    ].map(([label, format, field]) => statItem(label, format(w[field]), field)));
    keepFocus(() => {
      fill(boxes.inbound, edgeTable(data.inbound || [], true, 'inbound'));
      fill(boxes.outbound, edgeTable(data.outbound || [], false, 'outbound'));
      fill(boxes.routes, sortableTable([
        { key: 'name', label: 'ROUTE' },
        { key: 'service', label: 'SERVICE' },
        colPct('success_rate', 'SUCCESS'),
        colRps,
        ...latencyCols,
        colPct('retry_ratio', 'RETRY%'),
      ], data.routes || [], {
        key: 'routes', caption: 'Routes served', sort: { col: 'name', dir: 'asc' },
        empty: 'No routes served in the window',
        rowAttrs: (r) => ({ class: 'route-row', 'data-name': r.name }),
      }));
      fill(boxes.pods, sortableTable([
        { key: 'name', label: 'POD' },
        colPct('success_rate', 'SUCCESS'),
        colRps,
        colRequests,
        ...latencyCols,
        { key: 'tcp_conn', label: 'TCP', format: count, num: true },
      ], data.pods || [], {
        key: 'pods', caption: 'Pods', sort: { col: 'name', dir: 'asc' },
        empty: 'No pods report in the window',
        rowAttrs: (p) => ({ class: 'pod-row', 'data-name': p.name }),
      }));
    });
  }, REFRESH_MS, true);

  poll(async () => {
    const data = await api(`${base}/history`);
    if (!data) return;
    const points = Array.isArray(data.points) ? data.points : [];
    fill(sparks,
      sparkline(points, 'success_rate', { label: 'Success rate', format: (v) => pct(v), max: 1 }),
      sparkline(points, 'latency_ms_p99', { label: 'P99 latency', format: ms, min: 0 }),
      sparkline(points, 'rps', { label: 'Requests per second', format: rps, min: 0 }),
    );
  }, HISTORY_REFRESH_MS, false);
}

// ---------------------------------------------------------------------------------------------
// Page: topology (/topology)

const edgeKey = (e) => `${e.src_id || `${e.src_namespace}/${e.src}`}>${e.dst_id || `${e.dst_namespace}/${e.dst}`}`;

/** The label's lines: "✖ failing 50.0%", "↻ retry-heavy 12%", or the success rate when ok. */
function edgeLabel(edge, flags) {
  const lines = [];
  if (flags.includes('failing')) lines.push(`${FLAG_ICON.failing} failing ${pct(edge.success_rate, 1)}`);
  if (flags.includes('retry-heavy')) lines.push(`${FLAG_ICON['retry-heavy']} retry-heavy ${pct(edge.retry_ratio, 0)}`);
  return lines.length ? lines : [`${FLAG_ICON.ok} ${pct(edge.success_rate, 1)}`];
}

function edgeAriaLabel(edge, flags) {
  let text = `${edge.src} to ${edge.dst}: ${flags.length ? flags.join(', ') : 'ok'}, success ${pct(edge.success_rate, 1)}, ${rps(edge.rps)} rps`;
  if (isNum(edge.retry_ratio)) text += `, retries ${pct(edge.retry_ratio, 1)}`;
  return text;
}

/** The edge's polyline: the server's, else a straight line between the two boxes. */
function edgePoints(edge, nodesById) {
  if (Array.isArray(edge.points) && edge.points.length >= 2) return edge.points.map(([x, y]) => [Number(x), Number(y)]);
  const s = nodesById.get(edge.src_id);
  const d = nodesById.get(edge.dst_id);
  if (!s || !d) return null;
  return [[s.x + s.w, s.y + s.h / 2], [d.x, d.y + d.h / 2]];
}

/** The point halfway along a polyline, and the polyline with its end pulled back by `trim`. */
function polylineGeometry(points, trim) {
  const lengths = points.slice(1).map((p, i) => Math.hypot(p[0] - points[i][0], p[1] - points[i][1]));
  const total = lengths.reduce((a, b) => a + b, 0);
  let rest = total / 2;
  let mid = points[0];
  for (let i = 0; i < lengths.length; i++) {
    if (rest <= lengths[i] && lengths[i] > 0) {
      const t = rest / lengths[i];
      mid = [points[i][0] + t * (points[i + 1][0] - points[i][0]), points[i][1] + t * (points[i + 1][1] - points[i][1])];
      break;
    }
    rest -= lengths[i];
  }
  const trimmed = points.map((p) => [...p]);
  const [n, last] = [trimmed.length, lengths[lengths.length - 1]];
  if (last > trim * 2) { // the arrowhead's room
    const [[ax, ay], [bx, by]] = [trimmed[n - 2], trimmed[n - 1]];
    trimmed[n - 1] = [bx - ((bx - ax) * trim) / last, by - ((by - ay) * trim) / last];
  }
  const d = trimmed.map((p, i) => `${i ? 'L' : 'M'}${p[0].toFixed(1)} ${p[1].toFixed(1)}`).join(' ');
  return { mid, d };
}

const edgeStatusClass = (flags) => (flags.length ? flags.map((f) => `edge-${f}`).join(' ') : 'edge-ok');
const truncate = (text, max) => (text.length > max ? `${text.slice(0, Math.max(max - 1, 1))}…` : text);

function renderTopology(main) {
  const ARROW_TRIM = 10;
  let selected = null; // the selected edge's key
  let lastEdges = new Map();
  let opener = null; // the key of the edge that opened the panel, for Escape

  const summary = el('p', { class: 'summary', id: 'topology-summary' }, 'Loading…');
  const empty = el('p', { class: 'empty-state', id: 'topology-empty', hidden: true }, 'No traffic in the window');
  const canvas = el('div', { class: 'topology-canvas' });
  const title = el('h2', { id: 'edge-panel-title', tabindex: '-1' });
  const dl = el('dl', { class: 'panel-stats' });
  const note = el('p', { class: 'muted', hidden: true }, 'This edge had no traffic in the last refresh; showing its last numbers.');
  const tapLink = el('a', { class: 'tap-link', href: '/tap' }, 'Tap this edge');
  const close = el('button', { type: 'button', class: 'panel-close', 'aria-label': 'Close edge details' }, '×');
  const panel = el('aside', { id: 'edge-panel', 'aria-labelledby': 'edge-panel-title', hidden: true },
    el('div', { class: 'panel-head' }, title, close), note, dl, el('p', {}, tapLink));
  const legend = el('section', { class: 'legend', id: 'legend', 'aria-labelledby': 'legend-title' });
  main.append(el('h1', {}, 'Topology'), summary,
    el('div', { class: 'topology-layout' }, el('div', {}, empty, canvas), el('div', { class: 'topology-side' }, panel, legend)));

  const markSelected = () => {
    for (const g of canvas.querySelectorAll('g.edge')) {
      const on = selected !== null && g.getAttribute('data-focus') === `edge:${selected}`;
      g.classList.toggle('selected', on);
      g.setAttribute('aria-expanded', String(on));
    }
  };
  const closePanel = () => {
    panel.hidden = true;
    selected = null;
    markSelected();
    const back = opener && [...canvas.querySelectorAll('g.edge')].find((g) => g.getAttribute('data-focus') === `edge:${opener}`);
    if (back) back.focus();
  };
  close.addEventListener('click', closePanel);
  panel.addEventListener('keydown', (ev) => {
    if (ev.key === 'Escape') closePanel();
  });

  const fillPanel = (edge, stale) => {
    const flags = flagsOf(edge);
    title.textContent = `${edge.src} → ${edge.dst}`;
    note.hidden = !stale;
    const item = (term, ...value) => [el('dt', {}, term), el('dd', {}, ...value)];
    fill(dl,
      ...item('Success', pct(edge.success_rate)),
      ...item('RPS', rps(edge.rps)),
      ...item('Retries', pct(edge.retry_ratio)),
      ...item('Requests', count(edge.requests)),
      ...item('mTLS', typeof edge.secured === 'boolean' ? iconText(edge.secured ? '✓' : '✖', edge.secured ? 'secured' : 'not secured') : '-'),
      ...item('Flags', badges(flags, true)),
      ...item('From', `${edge.src_namespace ?? '-'}/${edge.src}`),
      ...item('To', `${edge.dst_namespace ?? '-'}/${edge.dst}${edge.dst_kind && edge.dst_kind !== 'deployment' ? ` (${edge.dst_kind})` : ''}`),
      (edge.server_ids || []).length ? item('Server identity', (edge.server_ids || []).map((id) => el('code', { class: 'identity' }, id))) : null,
    );
    tapLink.setAttribute('href', edge.tap ? `/tap?${edge.tap}` : '/tap');
  };

  const openPanel = (key) => {
    const edge = lastEdges.get(key);
    if (!edge) return;
    selected = key;
    opener = key;
    fillPanel(edge, false);
    panel.hidden = false;
    markSelected();
    title.focus();
  };

  const drawLegend = (thresholds) => {
    const failBelow = pct(thresholds.failing_below ?? FAILING_BELOW, 1);
    const retryAbove = pct(thresholds.retry_heavy_above ?? RETRY_HEAVY_ABOVE, 0);
    const swatch = (cls) => svgEl('svg', { class: 'swatch', width: 36, height: 12, viewBox: '0 0 36 12', 'aria-hidden': 'true' },
      svgEl('line', { class: `edge-line ${cls}`, x1: 2, y1: 6, x2: 34, y2: 6, 'stroke-width': 4 }));
    fill(legend, el('h2', { id: 'legend-title' }, 'Legend'), el('ul', {},
      el('li', {}, swatch('edge-ok'), ' ', iconText(FLAG_ICON.ok, `ok: success at least ${failBelow}, retries at most ${retryAbove}`)),
      el('li', {}, swatch('edge-failing'), ' ', iconText(FLAG_ICON.failing, `failing: success below ${failBelow}`)),
      el('li', {}, swatch('edge-retry-heavy'), ' ', iconText(FLAG_ICON['retry-heavy'], `retry-heavy: retries above ${retryAbove} of requests`)),
      el('li', {}, swatch('edge-failing edge-retry-heavy'), ' both: red and dashed, with both words'),
      el('li', {}, 'Width: requests per second (wider is busier); arrows point from caller to callee.'),
      el('li', {}, 'Boxes are workloads (open their page); dashed boxes are services outside the known workloads.'),
      el('li', {}, 'Select an edge (click, or Tab then Enter) for its numbers and a link to tap it.')));
  };

  poll(async () => {
    const data = await api(withWindow('/api/topology'));
    if (!data) return;
    const nodes = Array.isArray(data.nodes) ? data.nodes : [];
    const edges = Array.isArray(data.edges) ? data.edges : [];
    const width = isNum(data.width) && data.width > 0 ? data.width : 600;
    const height = isNum(data.height) && data.height > 0 ? data.height : 200;
    const nodesById = new Map(nodes.map((n) => [n.id, n]));
    const manyNamespaces = new Set(nodes.map((n) => n.namespace)).size > 1;
    const failingEdges = edges.filter((e) => flagsOf(e).includes('failing')).length;
    summary.textContent = `${plural(nodes.length, 'node', 'nodes')}, ${plural(edges.length, 'edge', 'edges')}${failingEdges ? `, ${failingEdges} failing` : ''}, last ${windowParam}`;
    empty.hidden = edges.length > 0;
    drawLegend(data.thresholds || {});
    lastEdges = new Map(edges.map((e) => [edgeKey(e), e]));

    const markers = ['ok', 'failing', 'retry-heavy'].map((kind) => svgEl('marker', {
      id: `arrow-${kind}`, class: `arrow arrow-${kind}`, viewBox: '0 0 10 10', refX: (10 - ARROW_TRIM / 1.4).toFixed(2), refY: 5,
      markerWidth: 14, markerHeight: 14, markerUnits: 'userSpaceOnUse', orient: 'auto',
    }, svgEl('path', { d: 'M0 0 L10 5 L0 10 z' })));

    const nodeGroup = svgEl('g', { class: 'nodes' }, ...nodes.map((n) => {
      const [x, y, w, h] = [Number(n.x) || 0, Number(n.y) || 0, Number(n.w) || 160, Number(n.h) || 44];
      const failing = isFailing(n);
      const shown = manyNamespaces ? `${n.namespace}/${n.name}` : String(n.name);
      const maxChars = Math.max(6, Math.floor((w - (failing ? 84 : 20)) / 7.4));
      // A workload that only calls others (a client, a load generator) says what it sends.
      const sendsOnly = n.success_rate == null && Number(n.sent_rps) > 0;
      const stats = n.kind !== 'deployment' ? String(n.kind || 'service')
        : sendsOnly ? `sends ${rps(n.sent_rps)} rps` : `${pct(n.success_rate, 1)} · ${rps(n.rps)} rps`;
      const body = [
        svgEl('title', {}, `${n.kind || 'workload'} ${n.namespace}/${n.name}`),
        svgEl('rect', { class: 'node-box', x, y, width: w, height: h, rx: 6 }),
        svgEl('text', { class: 'node-name', x: x + 10, y: y + 19 }, truncate(shown, maxChars)),
        svgEl('text', { class: 'node-stats', x: x + 10, y: y + h - 10 }, stats),
        failing ? svgEl('text', { class: 'node-flag', x: x + w - 8, y: y + 18, 'text-anchor': 'end' }, `${FLAG_ICON.failing} failing`) : null,
      ];
      const content = n.kind === 'deployment'
        ? svgEl('a', { href: workloadHref(n.namespace, n.name), 'data-focus': `node:${n.id}`,
          'aria-label': `${n.name}: ${failing ? 'failing, ' : ''}success ${pct(n.success_rate, 1)}, ${rps(n.rps)} rps` }, ...body)
        : body;
      return svgEl('g', {
        class: ['node', `node-${n.kind || 'deployment'}`, failing ? 'node-failing' : ''].join(' ').trim(), 'data-id': n.id,
      }, content);
    }));

    const edgeGroup = svgEl('g', { class: 'edges' }, ...edges.map((e) => {
      const pts = edgePoints(e, nodesById);
      if (!pts) return null;
      const flags = flagsOf(e);
      const lines = edgeLabel(e, flags);
      const key = edgeKey(e);
      const { mid, d } = polylineGeometry(pts, ARROW_TRIM);
      const marker = flags.includes('failing') ? 'failing' : flags.includes('retry-heavy') ? 'retry-heavy' : 'ok';
      const strokeWidth = isNum(e.width) && e.width > 0 ? e.width : 2;
      // The label sits above the line, clear of its stroke.
      const labelY = mid[1] - strokeWidth / 2 - 8 - (lines.length - 1) * 14;
      const g = svgEl('g', {
        class: `edge ${edgeStatusClass(flags)}${key === selected ? ' selected' : ''}`,
        'data-src': e.src, 'data-dst': e.dst, 'data-src-id': e.src_id, 'data-dst-id': e.dst_id, 'data-flags': flags.join(' '),
        'data-focus': `edge:${key}`, tabindex: '0', role: 'button', 'aria-label': edgeAriaLabel(e, flags),
        'aria-controls': 'edge-panel', 'aria-expanded': String(key === selected),
      },
      svgEl('path', { class: 'edge-hit', d, 'stroke-width': Math.max(14, strokeWidth + 8) }),
      svgEl('path', { class: 'edge-line', d, 'stroke-width': strokeWidth, 'marker-end': `url(#arrow-${marker})` }),
      svgEl('text', { class: 'edge-label', x: mid[0].toFixed(1), y: labelY.toFixed(1), 'text-anchor': 'middle' },
        lines.map((line, i) => svgEl('tspan', { x: mid[0].toFixed(1), dy: i ? 14 : null }, i ? ` ${line}` : line))));
      g.addEventListener('click', () => openPanel(key));
      g.addEventListener('keydown', (ev) => {
        if (ev.key !== 'Enter' && ev.key !== ' ') return;
        ev.preventDefault(); // Space would scroll
        openPanel(key);
      });
      return g;
    }));

    const drawing = svgEl('svg', {
      id: 'topology', viewBox: `0 0 ${width} ${height}`, width, height, 'aria-labelledby': 'topology-title',
    }, svgEl('title', { id: 'topology-title' }, `Topology: ${summary.textContent}`), svgEl('defs', {}, ...markers), nodeGroup, edgeGroup);
    keepFocus(() => fill(canvas, drawing));

    if (selected) {
      const edge = lastEdges.get(selected);
      if (edge) fillPanel(edge, false);
      else note.hidden = false;
    }
  }, REFRESH_MS, true);
}

// ---------------------------------------------------------------------------------------------
// Page: tap (/tap)

/** The status filter: "5xx", "503", "2xx,404"; returns a test and the tokens it did not read. */
function parseStatusFilter(text) {
  const tests = [];
  const bad = [];
  for (const token of String(text || '').split(/[\s,]+/).filter(Boolean)) {
    const n = Number(token.slice(0, 1));
    if (/^[1-5]xx$/i.test(token)) tests.push((s) => Math.floor(s / 100) === n);
    else if (/^[1-5]\d\d$/.test(token)) tests.push((s) => s === Number(token));
    else bad.push(token);
  }
  const match = tests.length === 0 ? () => true : (s) => isNum(s) && tests.some((t) => t(s));
  return { match, bad };
}

const TAP_COLUMNS = [
  ['Time', (d) => d.time],
  ['Proxy', (d) => d.proxy ?? '-'],
  ['Method', (d) => d.method ?? '-'],
  ['Authority', (d) => d.authority ?? '-'],
  ['Path', (d) => d.path ?? '-'],
  ['Status', (d) => (isNum(d.status) ? `${d.status}${d.grpc_status ? ` (grpc ${d.grpc_status})` : ''}` : '-')],
  ['Latency', (d) => us(d.latency_us)],
  ['Pod', (d) => d.dst_pod ?? '-'],
  ['Error', (d) => d.proxy_error || (isNum(d.reset_error) ? `reset ${d.reset_error}` : '-')],
];

function renderTap(main) {
  const query = new URLSearchParams(location.search);
  const FIELDS = [['resource', 'Resource', 'all workloads'], ['to', 'To', 'e.g. deployment/api'], ['from', 'From', 'e.g. deployment/web'],
    ['namespace', 'Namespace', 'e.g. default'], ['method', 'Method', 'e.g. GET'], ['path', 'Path prefix', 'e.g. /api'],
    ['authority', 'Authority', 'e.g. api:8080']];
  const inputs = {};
  const field = (id, label, placeholder, extra = {}) => {
    inputs[id] = el('input', { id, name: id, type: 'text', placeholder, value: query.get(id) || '', autocomplete: 'off', spellcheck: 'false', ...extra });
    return el('div', { class: 'field' }, el('label', { for: id }, label), inputs[id]);
  };
  const pauseButton = el('button', { type: 'button', id: 'pause', 'aria-pressed': 'false' }, 'Start');
  const applyButton = el('button', { type: 'submit', id: 'apply' }, 'Apply filters');
  const clearButton = el('button', { type: 'button', id: 'clear' }, 'Clear');
  const STATUS_HINT = 'Filters the rows shown: 5xx, 4xx, 2xx, exact codes like 503, or a comma list.';
  const statusHint = el('p', { id: 'status-hint', class: 'hint' }, STATUS_HINT);
  const form = el('form', { id: 'tap-form', class: 'tap-form' },
    el('fieldset', {}, el('legend', {}, 'Which requests to tap (sent to the proxies)'),
      el('div', { class: 'fields' }, ...FIELDS.map(([id, label, ph]) => field(id, label, ph)))),
    el('fieldset', {}, el('legend', {}, 'Which rows to show'),
      el('div', { class: 'fields' }, field('status', 'Status', '5xx, 503, 2xx', { 'aria-describedby': 'status-hint' })), statusHint),
    el('div', { class: 'buttons' }, applyButton, pauseButton, clearButton));
  const status = el('p', { id: 'tap-status', 'aria-live': 'polite' }, 'not started');
  const description = el('p', { id: 'tap-description', class: 'muted' });
  const tbody = el('tbody');
  const table = el('table', { id: 'tap-table', class: 'data tap' },
    el('caption', {}, 'Requests, newest first'),
    el('thead', {}, el('tr', {}, ...TAP_COLUMNS.map(([label]) => el('th', { scope: 'col' }, label)))),
    tbody);
  const topBox = el('section', { class: 'block', id: 'top-section' });
  main.append(el('h1', {}, 'Tap'), form, status, description, el('div', { class: 'table-wrap' }, table), el('h2', {}, 'Top paths'), topBox);

  let source = null;
  let state = 'idle'; // idle | connecting | streaming | retrying | stopped
  let [paused, skipped, total, proxies, dropped] = [false, 0, 0, 0, 0];
  let filter = parseStatusFilter(inputs.status.value);
  const rows = new Map(); // request id -> {tr, cells, data}

  const STATES = { idle: 'not started', connecting: 'connecting…', retrying: 'disconnected, retrying', stopped: 'stopped' };
  const showStatus = () => {
    let text = paused ? `paused, ${plural(skipped, 'event', 'events')} skipped`
      : state === 'streaming' ? `streaming from ${plural(proxies, 'proxy', 'proxies')}` : STATES[state];
    if (total > TAP_MAX_ROWS) text += `, showing last ${TAP_MAX_ROWS} of ${total}`;
    if (dropped > 0) text += `, ${dropped} dropped by the server (page too slow)`;
    if (status.textContent !== text) status.textContent = text;
    const label = state === 'idle' || state === 'stopped' ? 'Start' : paused ? 'Resume' : 'Pause';
    if (pauseButton.textContent !== label) pauseButton.textContent = label;
    pauseButton.setAttribute('aria-pressed', String(paused && label === 'Resume'));
  };

  const drawTop = (list) => {
    keepFocus(() => fill(topBox, sortableTable([
      { key: 'method', label: 'METHOD' },
      { key: 'authority', label: 'AUTHORITY' },
      { key: 'path', label: 'PATH' },
      { key: 'count', label: 'COUNT', format: count, num: true },
      colPct('success_rate', 'SUCCESS'),
      { key: 'best_us', label: 'BEST', format: us, num: true },
      { key: 'worst_us', label: 'WORST', format: us, num: true },
      { key: 'last_us', label: 'LAST', format: us, num: true },
    ], list, { key: 'top', id: 'top', caption: 'Top: requests by path since the tap started', empty: 'No requests yet' })));
  };

  const updateRow = (row) => {
    TAP_COLUMNS.forEach(([, text], i) => {
      const t = String(text(row.data));
      if (row.cells[i].textContent !== t) row.cells[i].textContent = t;
    });
    const s = row.data.status;
    row.tr.setAttribute('data-status', isNum(s) ? String(s) : '');
    row.tr.className = `tap-row${isNum(s) ? ` status-${Math.floor(s / 100)}xx` : ' pending'}`;
    row.tr.hidden = !filter.match(s);
  };

  const onTap = (line) => {
    if (!line || typeof line !== 'object' || line.id === undefined || line.id === null) return;
    if (paused) {
      skipped += 1;
      showStatus();
      return;
    }
    const id = String(line.id);
    let row = rows.get(id);
    if (!row) {
      const cells = TAP_COLUMNS.map(([label]) => el('td', { class: `col-${label.toLowerCase()}` }));
      row = { cells, data: { time: clock(new Date()) }, tr: el('tr', { class: 'tap-row', 'data-id': id, 'data-status': '' }, ...cells) };
      rows.set(id, row);
      total += 1;
      tbody.prepend(row.tr);
      while (rows.size > TAP_MAX_ROWS) {
        const oldest = rows.keys().next().value;
        rows.get(oldest).tr.remove();
        rows.delete(oldest);
      }
    }
    for (const [k, v] of Object.entries(line)) {
      if (v !== null && v !== undefined) row.data[k] = v;
    }
    updateRow(row);
    showStatus();
  };

  const parse = (text) => {
    try {
      return JSON.parse(text);
    } catch {
      return null;
    }
  };
  const params = () => new URLSearchParams(TAP_PARAMS.map((n) => [n, inputs[n].value.trim()]).filter(([, v]) => v));

  /** An EventSource that failed for good gives no reason: ask once more to read the error. */
  const explainFailure = async (url) => {
    const abort = new AbortController();
    try {
      const rsp = await fetch(url, { signal: abort.signal, headers: { Accept: 'text/event-stream' } });
      const body = rsp.ok ? null : await rsp.json().catch(() => null);
      setAlert('tap', rsp.ok ? 'The tap stream closed; press Start to tap again.' : body?.error || `The tap stream failed: HTTP ${rsp.status}`);
    } catch {
      setAlert('tap', 'The tap stream could not be opened: is the dashboard server running?');
    } finally {
      abort.abort();
    }
  };

  const stop = () => {
    if (source) source.close();
    source = null;
  };

  const clearRows = () => {
    rows.clear();
    tbody.replaceChildren();
    [total, skipped] = [0, 0];
    drawTop([]);
  };

  const start = (clear) => {
    stop();
    if (clear) clearRows();
    [paused, skipped, dropped, state] = [false, 0, 0, 'connecting'];
    setAlert('tap', null);
    description.textContent = '';
    const p = params();
    const keep = new URLSearchParams(p);
    if (inputs.status.value.trim()) keep.set('status', inputs.status.value.trim());
    setQuery(keep);
    const url = `/api/tap?${p}`;
    const es = new EventSource(url);
    source = es;
    es.addEventListener('ready', (ev) => {
      const data = parse(ev.data) || {};
      proxies = isNum(data.proxies) ? data.proxies : 0;
      const desc = Array.isArray(data.description) ? data.description.join(', ') : data.description;
      description.textContent = desc ? `Tapping ${desc}` : '';
      state = 'streaming';
      showStatus();
    });
    es.addEventListener('tap', (ev) => onTap(parse(ev.data)));
    es.addEventListener('top', (ev) => {
      const data = parse(ev.data);
      if (!data) return;
      if (isNum(data.dropped)) dropped = data.dropped;
      if (!paused && Array.isArray(data.rows)) drawTop(data.rows);
      showStatus();
    });
    es.addEventListener('error', (ev) => {
      if (source !== es) return;
      if (typeof ev.data === 'string') {
        // The server's `error` event: the stream is over.
        const data = parse(ev.data);
        setAlert('tap', (data && data.message) || ev.data || 'The tap failed');
        stop();
        state = 'stopped';
      } else if (es.readyState === EventSource.CLOSED) {
        stop();
        state = 'stopped';
        explainFailure(url);
      } else {
        state = 'retrying';
      }
      showStatus();
    });
    es.addEventListener('open', () => {
      if (source === es && state === 'retrying') state = proxies ? 'streaming' : 'connecting';
      showStatus();
    });
    showStatus();
  };

  form.addEventListener('submit', (ev) => {
    ev.preventDefault();
    start(true);
  });
  pauseButton.addEventListener('click', () => {
    if (!source) start(false);
    else {
      paused = !paused;
      if (!paused) skipped = 0;
      showStatus();
    }
  });
  clearButton.addEventListener('click', () => {
    clearRows();
    showStatus();
  });
  inputs.status.addEventListener('input', () => {
    filter = parseStatusFilter(inputs.status.value);
    if (filter.bad.length) inputs.status.setAttribute('aria-invalid', 'true');
    else inputs.status.removeAttribute('aria-invalid');
    statusHint.textContent = `${filter.bad.length ? `Not a status: ${filter.bad.join(', ')}. ` : ''}${STATUS_HINT}`;
    for (const row of rows.values()) row.tr.hidden = !filter.match(row.data.status);
  });
  window.addEventListener('pagehide', stop);
  drawTop([]);
  start(true);
}

// ---------------------------------------------------------------------------------------------
// Page: check (/check)

function renderCheck(main) {
  const summary = el('p', { class: 'summary', id: 'check-summary' }, 'Checking…');
  const results = el('div', { id: 'check-results' });
  const rerun = el('button', { type: 'button', id: 'check-rerun' }, 'Check again');
  main.append(el('h1', {}, 'Check'), summary, results, el('p', {}, rerun));

  const run = async () => {
    rerun.disabled = true;
    const data = await api('/api/check');
    rerun.disabled = false;
    if (!data) {
      summary.textContent = 'The check could not run.';
      return;
    }
    if (data.available === false) {
      fill(summary, el('span', { class: 'unavailable', id: 'check-unavailable' }, data.reason || 'Check is not available for this source.'));
      results.replaceChildren();
      return;
    }
    const findings = Array.isArray(data.findings) ? data.findings : [];
    const s = data.summary || {};
    const errors = isNum(s.errors) ? s.errors : findings.filter((f) => f.severity === 'error').length;
    const warnings = isNum(s.warnings) ? s.warnings : findings.filter((f) => f.severity === 'warning').length;
    const where = ` · ${isNum(s.objects) ? `${plural(s.objects, 'object', 'objects')} checked` : 'checked'}${data.dir ? ` in ${data.dir}` : ''}`;
    summary.className = `summary ${errors ? 'summary-error' : warnings ? 'summary-warning' : 'summary-ok'}`;
    fill(summary, errors || warnings
      ? [iconText('✖', plural(errors, 'error', 'errors')), ' · ', iconText('⚠', plural(warnings, 'warning', 'warnings')), where]
      : [iconText('✓', 'No problems found'), where]);
    const byFile = new Map();
    for (const f of findings) byFile.set(f.file || '(no file)', [...(byFile.get(f.file || '(no file)') || []), f]);
    fill(results, ...[...byFile].map(([file, list], n) => {
      return el('section', { class: 'check-file block', 'data-file': file, 'aria-labelledby': `check-file-${n}` },
        el('h2', { id: `check-file-${n}` }, el('code', {}, file)),
        el('div', { class: 'table-wrap' }, el('table', { class: 'data findings' },
          el('caption', { class: 'visually-hidden' }, `${plural(list.length, 'finding', 'findings')} in ${file}`),
          el('thead', {}, el('tr', {}, ...['Severity', 'Object', 'Field', 'Message'].map((h) => el('th', { scope: 'col' }, h)))),
          el('tbody', {}, ...list.map((f) => {
            const sev = f.severity === 'error' ? 'error' : 'warning';
            return el('tr', { class: `finding finding-${sev}`, 'data-severity': sev },
              el('td', {}, el('span', { class: `sev sev-${sev}` }, iconText(sev === 'error' ? '✖' : '⚠', sev))),
              el('td', {}, f.object ?? '-'),
              el('td', {}, f.field ? el('code', {}, f.field) : '-'),
              el('td', {}, f.message ?? '-'));
          })))));
    }));
  };
  const safeRun = () => run().catch((e) => setAlert('script', `The page failed to draw: ${errorText(e)}`));
  rerun.addEventListener('click', safeRun);
  safeRun();
}

// ---------------------------------------------------------------------------------------------
// Start

const PAGES = { overview: renderOverview, workload: renderWorkload, topology: renderTopology, tap: renderTap, check: renderCheck };

window.addEventListener('unhandledrejection', (ev) => {
  ev.preventDefault();
  setAlert('script', `The page failed: ${errorText(ev.reason)}`);
});

function start() {
  const main = document.getElementById('main');
  if (!main) return;
  main.replaceChildren();
  try {
    initShell();
    const render = PAGES[document.body.dataset.page];
    if (render) render(main);
    else main.append(el('h1', {}, 'Not found'), el('p', {}, 'This page is not part of the dashboard.'));
  } catch (e) {
    setAlert('script', `The page failed to draw: ${errorText(e)}`);
  }
}

start();
