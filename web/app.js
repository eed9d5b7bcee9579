// MedSplit web dashboard: one page, plain ES2022, no dependencies.
// Everything the API returns is put into the page as text nodes (never as HTML), and no
// inline styles are used: the Content-Security-Policy forbids them.

// ---------------------------------------------------------------------------------------------
// DOM helpers

const SVG_NS = 'http://www.w3.org/2000/svg';

function setAttrs(el, attrs) {
  for (const [key, value] of Object.entries(attrs ?? {})) {
    if (value == null || value === false) continue;
    if (key.startsWith('on') && typeof value === 'function') {
      el.addEventListener(key.slice(2), value);
    } else {
      el.setAttribute(key, value === true ? '' : String(value));
    }
  }
}

function appendChildren(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child == null || child === false) continue;
    el.append(child instanceof Node ? child : String(child));
  }
}

/** Creates an HTML element: `h('a', {href: '/'}, 'Home')`. */
function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  setAttrs(el, attrs);
  appendChildren(el, children);
  return el;
}

/** Creates an SVG element. */
function s(tag, attrs, ...children) {
  const el = document.createElementNS(SVG_NS, tag);
  setAttrs(el, attrs);
  appendChildren(el, children);
  return el;
}

const srOnly = (text) => h('span', { class: 'visually-hidden' }, text);

/** A horizontally scrollable, keyboard-reachable wrapper for a wide table. */
function tableWrap(table, label) {
  return h('div', {
    class: 'table-wrap', tabindex: '0', role: 'region', 'aria-label': label, 'data-focus-key': `wrap-${table.id}`,
  }, table);
}

/** A table with a caption, column headers and rows of cells (the first one a row header if asked). */
function dataTable({ id, caption, columns, rows, rowHeaders = false }) {
  const first = (c) => (rowHeaders ? h('th', { scope: 'row' }, c) : h('td', {}, c));
  return tableWrap(
    h(
      'table',
      { id },
      h('caption', {}, caption),
      h('thead', {}, h('tr', {}, columns.map((c) => h('th', { scope: 'col' }, c)))),
      h('tbody', {}, rows.map(([head, ...rest]) => h('tr', {}, first(head), rest.map((c) => h('td', {}, c))))),
    ),
    caption,
  );
}

/**
 * Marks the table boxes under `root` whose table is wider than they are: they show shadows at
 * the edges that hide columns and say "scroll sideways" in their caption.
 */
function markScrolling(root = document) {
  root.querySelectorAll('.table-wrap').forEach((w) => w.classList.toggle('scrolls', w.scrollWidth > w.clientWidth + 1));
}

/**
 * Replaces a container's content in place, keeping the focused control (matched by its
 * data-focus-key) and the horizontal scroll of tables inside. When the focused control is gone
 * (the row's action is done), focus goes to the table, or the container, instead of the page.
 */
function patch(container, ...nodes) {
  const active = document.activeElement;
  const focusKey = container.contains(active) ? active.dataset.focusKey : undefined;
  const scrolls = [...container.querySelectorAll('.table-wrap')].map((w) => w.scrollLeft);
  container.replaceChildren();
  appendChildren(container, nodes);
  container.querySelectorAll('.table-wrap').forEach((w, i) => {
    if (scrolls[i]) w.scrollLeft = scrolls[i];
  });
  markScrolling(container);
  if (focusKey) {
    const same = container.querySelector(`[data-focus-key="${CSS.escape(focusKey)}"]`);
    const fallback = container.querySelector('.table-wrap') ?? container;
    if (!same && !fallback.hasAttribute('tabindex')) fallback.setAttribute('tabindex', '-1');
    (same ?? fallback).focus({ preventScroll: true });
  }
}

const rendered = new WeakMap();

/** Like patch, but only when `data` differs from what the container shows already. */
function patchIfChanged(container, data, build) {
  const json = JSON.stringify(data);
  if (rendered.get(container) === json) return;
  rendered.set(container, json);
  patch(container, build(data));
}

// ---------------------------------------------------------------------------------------------
// Formatting

const dateFormat = new Intl.DateTimeFormat(undefined, { dateStyle: 'medium', timeStyle: 'medium' });
const fmtDate = (iso) => (iso ? dateFormat.format(new Date(iso)) : '—');
const timeEl = (iso) => (iso ? h('time', { datetime: iso }, fmtDate(iso)) : '—');
const fmtPct = (x) => (x == null ? '—' : `${(x * 100).toFixed(2)}%`);
const fmtLoss = (x) => (x == null ? '—' : x.toFixed(4));
const fmtMB = (bytes) => (bytes == null ? '—' : `${(bytes / 1e6).toFixed(1)} MB`);
const fmtSecs = (x) => (x == null ? '—' : `${x.toFixed(1)} s`);
const fmtCount = (n) => (n == null ? '—' : n.toLocaleString());
const wholePct = (x) => `${Math.round((x ?? 0) * 100)}%`;

function fmtClock(d = new Date()) {
  return [d.getHours(), d.getMinutes(), d.getSeconds()].map((n) => String(n).padStart(2, '0')).join(':');
}

function fmtAgo(iso) {
  const secs = Math.round((Date.now() - new Date(iso).getTime()) / 1000);
  if (secs < 1) return 'just now';
  if (secs < 60) return `${secs} s ago`;
  if (secs < 3600) return `${Math.floor(secs / 60)} min ago`;
  if (secs < 86400) return `${Math.floor(secs / 3600)} h ago`;
  return fmtDate(iso);
}

/** A relative time ("12 s ago") with the exact time in its title. */
const agoEl = (iso) => (iso ? h('time', { datetime: iso, title: fmtDate(iso) }, fmtAgo(iso)) : 'never');

/** Compact text for a small JSON object: `name: "Alpha", round: 3` (rounds counted from 1). */
function fmtDetail(detail) {
  if (detail == null || typeof detail !== 'object') return detail == null ? '—' : JSON.stringify(detail);
  const entries = Object.entries(detail);
  if (entries.length === 0) return '—';
  const value = (k, v) => {
    if (k === 'round' && Number.isInteger(v)) return String(v + 1);
    if (typeof v === 'number' && !Number.isInteger(v)) return String(Number(v.toPrecision(4)));
    return JSON.stringify(v);
  };
  return entries.map(([k, v]) => `${k}: ${value(k, v)}`).join(', ');
}

const ROLE_LABELS = { platform_admin: 'Platform admin', hospital_admin: 'Hospital admin', researcher: 'Researcher' };
const MODEL_LABELS = {
  m1: 'M1 (cut 256)', m1_wide: 'M1 wide (cut 512)', m1_tail: 'M1 with a client tail (16 encrypted outputs)',
};

// A job's model: a preset name, or the spec's table (named while it is exactly its preset).
function modelLabel(model) {
  const preset = typeof model === 'string' ? model : model?.preset;
  return preset ? (MODEL_LABELS[preset] ?? preset) : 'Custom';
}
const LABEL_SET_LABELS = { aami: 'AAMI: N, S, V, F, Q', papers: 'The papers’: N, L, R, A, V' };
const PREPROCESSING_LABELS = {
  papers: 'The papers’ (as pre-cut beat files)',
  inter_patient: 'Inter-patient (baseline removed, RR-interval features)',
};
const CLASS_WEIGHT_LABELS = { uniform: 'Uniform', balanced: 'Balanced' };
const LOCAL_WORK_LABELS = { epochs: 'Epochs (whole passes)', steps: 'Steps (batches)' };
const OPTIMIZER_LABELS = { adam: 'Adam', sgd: 'SGD' };
const FAILURE_LABELS = { skip: 'Skip the visit, go on', fail: 'Fail the whole job' };
const RELEASE_LABELS = {
  participants: 'The participating hospitals’ agents may export it',
  nobody: 'Nobody: the server layer stays on the coordinator (private inference only)',
};
const STATUS_LABELS = {
  pending: 'Pending', running: 'Running', completed: 'Completed', failed: 'Failed', cancelled: 'Cancelled',
  declined: 'Declined', waiting: 'Waiting', queued: 'Queued', skipped: 'Skipped', approved: 'Approved',
  online: 'Online', offline: 'Offline', revoked: 'Revoked', active: 'Active', disabled: 'Disabled',
};
const LIVE_JOB = new Set(['pending', 'running']);

function badge(status, label) {
  const key = String(status).replace(/[^a-z_]/g, '');
  return h('span', { class: `badge badge-${key}` }, label ?? STATUS_LABELS[status] ?? status);
}

function encryptionBadge(spec) {
  return spec.insecure_plaintext
    ? h('span', { class: 'badge badge-plaintext' }, '⚠ Plaintext (HE off)')
    : h('span', { class: 'badge badge-encrypted' }, 'HE on (encrypted)');
}

// ---------------------------------------------------------------------------------------------
// API: the one place that talks to the server

const session = { me: null, csrf: null };

class ApiError extends Error {
  constructor(status, body) {
    super(body?.error ?? `request failed (${status})`);
    this.status = status;
    this.field = body?.field ?? null;
    // The bare message of a field error: "must be ..." rather than "rounds: must be ...".
    const prefix = `${this.field}: `;
    this.detail = body?.message ?? (this.field && this.message.startsWith(prefix)
      ? this.message.slice(prefix.length) : this.message);
  }
}

/** Thrown after a 401: the session is gone and the login page is being shown. */
class SessionEnded extends Error {}

function setSession(me) {
  session.me = me?.authenticated ? me : null;
  session.csrf = session.me?.csrf_token ?? null;
}

async function request(method, path, body) {
  const headers = { Accept: 'application/json' };
  const init = { method, headers, credentials: 'same-origin', cache: 'no-store' };
  if (method !== 'GET') headers['X-CSRF-Token'] = session.csrf ?? '';
  if (body !== undefined) {
    headers['Content-Type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  try {
    return await fetch(path, init);
  } catch {
    throw new ApiError(0, null);
  }
}

async function readBody(res) {
  const text = await res.text();
  if (!text) return null;
  try {
    return JSON.parse(text);
  } catch {
    return { error: text };
  }
}

/**
 * Calls the API and returns the parsed JSON (null for 204). Throws ApiError for any other
 * failure; a 401 ends the session (unless `quiet401`) and throws SessionEnded.
 */
async function api(method, path, body, { quiet401 = false } = {}) {
  let res = await request(method, path, body);
  if (res.status === 403 && method !== 'GET' && session.csrf && (await renewCsrf())) {
    res = await request(method, path, body);
  }
  if (res.status === 401 && !quiet401) {
    endSession();
    throw new SessionEnded('session ended');
  }
  const data = res.status === 204 ? null : await readBody(res);
  if (!res.ok) throw new ApiError(res.status, data);
  return data;
}

/** After a 403 on a change: re-reads the CSRF token (another tab may have logged in again). */
async function renewCsrf() {
  const sent = session.csrf;
  try {
    const res = await request('GET', '/v1/me');
    const me = res.ok ? await res.json() : null;
    if (me?.authenticated && me.csrf_token && me.csrf_token !== sent) {
      setSession(me);
      return true;
    }
  } catch {
    // Keep the original 403.
  }
  return false;
}

const GET = (path) => api('GET', path);
const POST = (path, body) => api('POST', path, body);

function errorText(e) {
  if (e instanceof ApiError) {
    if (e.status === 0) return 'Cannot reach the server; check your connection and try again.';
    if (e.status >= 500) return 'Something went wrong on the server; try again.';
    return e.message;
  }
  return 'Something went wrong in this page; reload it and try again.';
}

// ---------------------------------------------------------------------------------------------
// Messages

const toastTimers = [];

/** Empties the live region (and hides the toast). */
function clearAnnouncement() {
  toastTimers.splice(0).forEach(clearTimeout);
  document.getElementById('status').textContent = '';
}

/**
 * Says something in the one polite live region (also shown as a toast). The message belongs to
 * the page shown now: it goes when that page is left, or after 8 s.
 */
function announce(message, kind = 'info') {
  const region = document.getElementById('status');
  clearAnnouncement();
  region.className = `toast toast-${kind}`;
  // A short delay makes screen readers announce a repeated message again.
  toastTimers.push(setTimeout(() => { region.textContent = message; }, 50),
    setTimeout(() => { region.textContent = ''; }, 8000));
}

/** Wraps an async event handler so that failures are shown, never thrown. */
function guard(fn) {
  return async (event) => {
    try {
      await fn(event);
    } catch (e) {
      if (!(e instanceof SessionEnded)) announce(errorText(e), 'error');
    }
  };
}

/** Disables a button while `fn` runs. */
async function busy(button, fn) {
  button.disabled = true;
  try {
    return await fn();
  } finally {
    button.disabled = false;
  }
}

// ---------------------------------------------------------------------------------------------
// Router

const HOMES = { platform_admin: '/admin/hospitals', hospital_admin: '/hospital', researcher: '/jobs' };

const NAV = {
  platform_admin: [['/admin/hospitals', 'Hospitals'], ['/admin/users', 'Users'], ['/admin/jobs', 'Jobs'], ['/admin/audit', 'Audit log']],
  hospital_admin: [['/hospital', 'Agents'], ['/hospital/jobs', 'Job consent']],
  researcher: [['/jobs', 'Jobs']],
};

const ADMIN = ['platform_admin'];
const ROUTES = [
  { path: /^\/login$/, page: loginPage, public: true },
  { path: /^\/admin\/hospitals$/, page: hospitalsPage, roles: ADMIN },
  { path: /^\/admin\/users$/, page: usersPage, roles: ADMIN },
  { path: /^\/admin\/audit$/, page: auditPage, roles: ADMIN },
  { path: /^\/admin\/jobs$/, page: allJobsPage, roles: ADMIN },
  { path: /^\/hospital$/, page: agentsPage, roles: ['hospital_admin'] },
  { path: /^\/hospital\/jobs$/, page: consentPage, roles: ['hospital_admin'] },
  { path: /^\/jobs$/, page: jobsPage, roles: ['researcher'] },
  { path: /^\/jobs\/new$/, page: newJobPage, roles: ['researcher'] },
  { path: /^\/jobs\/(\d+)$/, page: jobPage },
];

let current = null; // the page shown: { active, cleanups, key }
let flash = null; // a message for the next page (the login page shows it)
let firstRender = true;

function navigate(path, { replace = false, message = null } = {}) {
  flash = message;
  history[replace ? 'replaceState' : 'pushState'](null, '', path);
  render();
}

function leavePage() {
  clearAnnouncement();
  if (!current) return;
  current.active = false;
  for (const cleanup of current.cleanups) cleanup();
  current = null;
}

function safeNext(url) {
  const next = url.searchParams.get('next');
  return next && next.startsWith('/') && !next.startsWith('//') && !next.startsWith('/login') ? next : null;
}

function render() {
  leavePage();
  const url = new URL(location.href);
  const path = url.pathname.length > 1 ? url.pathname.replace(/\/+$/, '') : '/';
  const me = session.me;
  if (path === '/') return navigate(me ? HOMES[me.role] : '/login', { replace: true, message: flash });
  const route = ROUTES.find((r) => r.path.test(path));
  if (route && !route.public && !me) {
    return navigate(`/login?next=${encodeURIComponent(url.pathname + url.search)}`, { replace: true, message: flash });
  }
  if (route?.public && me) return navigate(safeNext(url) ?? HOMES[me.role], { replace: true });

  current = { active: true, cleanups: [], key: url.pathname + url.search };
  renderHeader(path);
  const main = document.getElementById('main');
  main.replaceChildren();
  let view = route?.page ?? notFoundPage;
  if (route?.roles && !route.roles.includes(me.role)) view = forbiddenPage;
  const params = route ? path.match(route.path).slice(1) : [];
  view(current, ...params, url);
  markScrolling(main);
  flash = null;
  if (!firstRender) main.querySelector('h1')?.focus();
  firstRender = false;
}

/** Builds the page's heading and sets the document title. */
function pageHeading(text) {
  document.title = `${text} · MedSplit`;
  return h('h1', { tabindex: '-1' }, text);
}

function renderHeader(path) {
  const me = session.me;
  const header = document.getElementById('site-header');
  const brand = h('a', { class: 'brand', href: '/' },
    h('img', { src: '/assets/favicon.svg', alt: '', width: '24', height: '24' }), 'MedSplit');
  if (!me) return header.replaceChildren(brand);
  const links = NAV[me.role] ?? [];
  const exact = links.some(([href]) => href === path);
  const items = links.map(([href, label]) => {
    const inSection = !exact && path.startsWith(`${href}/`);
    return h('li', {}, h('a', {
      href, 'aria-current': href === path ? 'page' : null, class: inSection ? 'in-section' : null,
    }, label));
  });
  header.replaceChildren(
    brand,
    h('nav', { 'aria-label': 'Main' }, h('ul', {}, items)),
    h('div', { class: 'account' },
      h('span', { class: 'who' }, h('span', { class: 'email' }, me.email),
        me.hospital ? h('span', { class: 'hospital' }, me.hospital) : null,
        h('span', { class: 'role' }, ROLE_LABELS[me.role] ?? me.role)),
      h('button', { type: 'button', class: 'button-quiet', id: 'logout', onclick: guard(logout) }, 'Log out')),
  );
}

async function logout() {
  leavePage(); // no poll may start (and meet a 401) once the session is gone
  try {
    await api('DELETE', '/v1/auth/session', undefined, { quiet401: true });
  } catch (e) {
    if (!(e instanceof ApiError && e.status === 401)) {
      render(); // still logged in: show the page again
      throw e;
    }
  }
  setSession(null);
  navigate('/login');
  announce('You have logged out.');
}

function endSession() {
  setSession(null);
  if (location.pathname === '/login') return;
  navigate(`/login?next=${encodeURIComponent(location.pathname + location.search)}`, {
    replace: true, message: 'Your session has ended; please log in again.',
  });
}

function onLinkClick(event) {
  if (event.defaultPrevented || event.button !== 0) return;
  if (event.metaKey || event.ctrlKey || event.shiftKey || event.altKey) return;
  const a = event.target.closest?.('a[href]');
  if (!a || a.target || a.hasAttribute('download')) return;
  const url = new URL(a.href, location.href);
  if (url.origin !== location.origin || /^\/(v1|assets)\//.test(url.pathname)) return;
  if (url.hash && url.pathname === location.pathname && url.search === location.search) return;
  event.preventDefault();
  navigate(url.pathname + url.search);
}

function onPopState() {
  // A change of the #fragment only (the skip link) is not a new page.
  if (current && current.key === location.pathname + location.search) return;
  flash = null;
  render();
}

// ---------------------------------------------------------------------------------------------
// Polling: one request chain at a time, stopped when the page is left

function poller(page, fn, intervalMs, onError) {
  let timer = 0;
  let running = false;
  let again = false;
  let stopped = false;
  const alive = () => !stopped && page.active;

  async function tick() {
    clearTimeout(timer);
    if (!alive()) return;
    if (running) {
      again = true;
      return;
    }
    running = true;
    try {
      if (!document.hidden) await fn();
    } catch (e) {
      if (!(e instanceof SessionEnded) && alive()) onError?.(e);
    } finally {
      running = false;
    }
    if (!alive()) return;
    if (again) {
      again = false;
      tick();
    } else {
      timer = setTimeout(tick, intervalMs);
    }
  }

  page.cleanups.push(() => clearTimeout(timer));
  tick();
  return {
    refresh: tick,
    stop() {
      stopped = true;
      clearTimeout(timer);
    },
  };
}

/** A status line for a polled view: "Live — updated 12:00:03" or the last error. */
function liveLine(id) {
  const el = h('p', { class: 'live-line', id });
  return {
    el,
    ok(prefix = 'Live — updated') {
      el.classList.remove('live-error');
      el.textContent = `${prefix} ${fmtClock()}`;
    },
    error(e) {
      el.classList.add('live-error');
      el.textContent = `Could not update at ${fmtClock()}: ${errorText(e)} Retrying.`;
    },
  };
}

function loading() {
  return h('p', { class: 'loading' }, 'Loading…');
}

function loadError(e) {
  return h('p', { class: 'error-text', role: 'alert' }, errorText(e));
}

// ---------------------------------------------------------------------------------------------
// Forms: labelled fields and error messages bound to them

/** A labelled control with an optional hint below it; an error message goes right after the control. */
function field(label, control, hint) {
  const hintEl = hint ? h('p', { class: 'hint', id: `${control.id}-hint` }, hint) : null;
  if (hintEl) control.setAttribute('aria-describedby', hintEl.id);
  return h('div', { class: 'field' }, h('label', { for: control.id }, label), control, hintEl);
}

function checkField(label, control, hint) {
  const hintEl = hint ? h('p', { class: 'hint', id: `${control.id}-hint` }, hint) : null;
  if (hintEl) control.setAttribute('aria-describedby', hintEl.id);
  return h('div', { class: 'field field-check' }, control, h('label', { for: control.id }, label), hintEl);
}

const input = (id, name, attrs = {}) => h('input', { id, name, type: 'text', ...attrs });

function select(id, name, options, selected) {
  return h('select', { id, name },
    options.map(([value, label]) => h('option', { value, selected: value === selected }, label)));
}

/** Error display of one form: a form-level alert plus messages next to fields. */
function formErrors(form) {
  const alert = h('p', { class: 'form-error', role: 'alert', id: `${form.id}-error` });
  form.prepend(alert);
  const marked = [];
  return {
    clear() {
      alert.textContent = '';
      form.querySelectorAll('.field-error').forEach((el) => el.remove());
      for (const el of marked.splice(0)) {
        el.removeAttribute('aria-invalid');
        const original = el.dataset.describedby;
        if (original) el.setAttribute('aria-describedby', original);
        else el.removeAttribute('aria-describedby');
      }
    },
    /** Puts `message` next to `target` (a control or fieldset) and focuses `focus`. */
    field(target, message, focus = target) {
      const id = `${target.id}-error`;
      document.getElementById(id)?.remove();
      const msg = h('p', { class: 'field-error', id }, message);
      if (target.tagName === 'FIELDSET') target.querySelector('legend').after(msg);
      else target.after(msg);
      if (!marked.includes(target)) {
        target.dataset.describedby = target.getAttribute('aria-describedby') ?? '';
        marked.push(target);
      }
      // While the field is wrong, the message alone describes it (the hint stays visible).
      target.setAttribute('aria-invalid', 'true');
      target.setAttribute('aria-describedby', id);
      if (marked.length === 1) focus.focus();
    },
    form(message) {
      alert.textContent = message;
    },
  };
}

/**
 * Shows an API error at the field it names, else as a form alert. `locate(path)` gives a
 * control, or `{el, focus}` when the message belongs to a group (a fieldset) and focus to one
 * of its controls.
 */
function showApiError(errors, e, locate) {
  const target = e instanceof ApiError && e.field ? locate(e.field) : null;
  if (target) showAt(errors, target, e.detail);
  else errors.form(errorText(e));
}

function showAt(errors, target, message) {
  if (target instanceof Element) errors.field(target, message);
  else errors.field(target.el, message, target.focus);
}

// ---------------------------------------------------------------------------------------------
// Pages: login, not found

function loginPage(page, url) {
  const email = input('login-email', 'email', { type: 'email', autocomplete: 'username', required: true });
  const password = input('login-password', 'password', { type: 'password', autocomplete: 'current-password', required: true });
  const submit = h('button', { type: 'submit', id: 'login-submit' }, 'Log in');
  const form = h('form', { id: 'login-form', class: 'stack', novalidate: true },
    field('Email', email), field('Password', password), h('div', { class: 'actions' }, submit));
  const errors = formErrors(form);

  form.addEventListener('submit', guard(async (event) => {
    event.preventDefault();
    errors.clear();
    if (!email.value.trim() || !password.value) {
      errors.form('Enter your email and password.');
      (email.value.trim() ? password : email).focus();
      return;
    }
    try {
      const me = await busy(submit, () => api('POST', '/v1/auth/session',
        { email: email.value.trim(), password: password.value }, { quiet401: true }));
      setSession(me);
      navigate(safeNext(url) ?? HOMES[me.role] ?? '/', { replace: true });
      announce(`Logged in as ${me.email}`);
    } catch (e) {
      if (e instanceof ApiError && e.status === 401) {
        errors.form('Wrong email or password');
        password.select();
        return;
      }
      showApiError(errors, e, (f) => ({ email, password })[f]);
    }
  }));

  const notice = flash ? h('p', { class: 'notice', role: 'status', id: 'login-notice' }, flash) : null;
  document.getElementById('main').append(h('div', { class: 'login-box panel' },
    pageHeading('Log in'), notice,
    h('p', { class: 'lede' }, 'MedSplit trains one ECG model across hospitals; patient data never leaves them.'),
    form));
}

function notFoundPage() {
  document.getElementById('main').append(pageHeading('Not found'),
    h('p', {}, 'There is no page at this address.'),
    h('p', {}, h('a', { href: '/' }, 'Go to the home page')));
}

function forbiddenPage() {
  document.getElementById('main').append(pageHeading('Not available'),
    h('p', {}, 'This page is not available to your role.'),
    h('p', {}, h('a', { href: '/' }, 'Go to your home page')));
}

// ---------------------------------------------------------------------------------------------
// Platform admin: hospitals, users, audit log, all jobs

const HOSPITAL_NAME = /^[A-Za-z0-9._-]{1,64}$/;

function hospitalsPage(page) {
  const name = input('hospital-name', 'name', { autocomplete: 'off', maxlength: '64' });
  const submit = h('button', { type: 'submit' }, 'Create hospital');
  const form = h('form', { id: 'hospital-form', class: 'inline-form', novalidate: true },
    field('Name', name, '1 to 64 characters: letters, digits, - _ .'), h('div', { class: 'actions' }, submit));
  const errors = formErrors(form);
  const list = h('div', { class: 'list' }, loading());

  async function load() {
    const hospitals = await GET('/v1/hospitals');
    if (!page.active) return;
    patch(list, hospitals.length === 0
      ? h('p', { class: 'empty' }, 'No hospitals yet. Create the first one above.')
      : dataTable({
        id: 'hospitals-table', caption: 'Hospitals',
        columns: ['Name', 'Status', 'Created', 'Actions'],
        rows: hospitals.map((x) => [x.name, x.disabled ? badge('disabled') : badge('active'), timeEl(x.created_at),
          x.disabled ? '—' : h('button', {
            type: 'button', class: 'button-danger small', 'data-focus-key': `disable-${x.id}`,
            onclick: guard(() => disableHospital(x)),
          }, 'Disable', srOnly(` ${x.name}`))]),
      }));
  }

  async function disableHospital(x) {
    if (!window.confirm(`Disable hospital ${x.name}? Its users can no longer log in, its agents are refused, and new jobs cannot name it.`)) return;
    await POST(`/v1/hospitals/${x.id}/disable`);
    if (!page.active) return;
    announce(`Hospital ${x.name} disabled`);
    await load();
  }

  form.addEventListener('submit', guard(async (event) => {
    event.preventDefault();
    errors.clear();
    if (!HOSPITAL_NAME.test(name.value)) return errors.field(name, '1 to 64 characters: letters, digits, - _ .');
    try {
      const created = await busy(submit, () => POST('/v1/hospitals', { name: name.value }));
      if (!page.active) return;
      form.reset();
      announce(`Hospital ${created.name} created`);
      await load();
    } catch (e) {
      if (e instanceof ApiError && e.status === 409) errors.field(name, e.message);
      else showApiError(errors, e, (f) => (f === 'name' ? name : null));
    }
  }));

  document.getElementById('main').append(pageHeading('Hospitals'),
    h('section', { class: 'panel', 'aria-labelledby': 'new-hospital-heading' },
      h('h2', { id: 'new-hospital-heading' }, 'New hospital'), form),
    h('section', { 'aria-label': 'All hospitals' }, list));
  load().catch((e) => e instanceof SessionEnded || patch(list, loadError(e)));
}

function usersPage(page) {
  const email = input('user-email', 'email', { type: 'email', autocomplete: 'off' });
  const password = input('user-password', 'password', { type: 'password', autocomplete: 'new-password' });
  const role = select('user-role', 'role', Object.entries(ROLE_LABELS).reverse(), 'researcher');
  const hospital = select('user-hospital', 'hospital_id', [['', 'Choose a hospital']], '');
  const hospitalField = field('Hospital', hospital, 'Only hospital admins belong to a hospital.');
  const submit = h('button', { type: 'submit' }, 'Create user');
  const form = h('form', { id: 'user-form', class: 'form-grid', novalidate: true },
    field('Email', email), field('Password', password, 'At least 12 characters.'),
    field('Role', role), hospitalField, h('div', { class: 'actions' }, submit));
  const errors = formErrors(form);
  const list = h('div', { class: 'list' }, loading());
  let hospitals = [];

  const syncHospital = () => {
    const needed = role.value === 'hospital_admin';
    hospitalField.hidden = !needed;
    hospital.disabled = !needed;
  };
  role.addEventListener('change', syncHospital);
  syncHospital();

  async function load() {
    const [users, hs] = await Promise.all([GET('/v1/users'), GET('/v1/hospitals')]);
    if (!page.active) return;
    hospitals = hs;
    const chosen = hospital.value;
    patch(hospital, h('option', { value: '' }, 'Choose a hospital'),
      hs.filter((x) => !x.disabled).map((x) => h('option', { value: x.id, selected: String(x.id) === chosen }, x.name)));
    const hospitalName = (id) => hospitals.find((x) => x.id === id)?.name ?? (id == null ? '—' : `#${id}`);
    patch(list, dataTable({
      id: 'users-table', caption: 'Users',
      columns: ['Email', 'Role', 'Hospital', 'Status', 'Created', 'Actions'],
      rows: users.map((u) => [u.email + (u.id === session.me?.id ? ' (you)' : ''), ROLE_LABELS[u.role] ?? u.role,
        hospitalName(u.hospital_id), u.disabled ? badge('disabled') : badge('active'), timeEl(u.created_at),
        u.disabled ? '—' : h('button', {
          type: 'button', class: 'button-danger small', 'data-focus-key': `disable-${u.id}`,
          onclick: guard(() => disableUser(u)),
        }, 'Disable', srOnly(` ${u.email}`))]),
    }));
  }

  async function disableUser(u) {
    if (!window.confirm(`Disable user ${u.email}? They can no longer log in.`)) return;
    await POST(`/v1/users/${u.id}/disable`);
    if (!page.active) return;
    announce(`User ${u.email} disabled`);
    await load();
  }

  function localErrors() {
    const found = [];
    const e = email.value.trim();
    if (e.length < 3 || e.length > 254 || !e.includes('@')) found.push([email, 'must be an email address']);
    if ([...password.value].length < 12) found.push([password, 'must be at least 12 characters']);
    if (role.value === 'hospital_admin' && !hospital.value) found.push([hospital, 'a hospital admin needs a hospital']);
    return found;
  }

  form.addEventListener('submit', guard(async (event) => {
    event.preventDefault();
    errors.clear();
    const found = localErrors();
    if (found.length) return found.forEach(([el, msg]) => errors.field(el, msg));
    const body = {
      email: email.value.trim(), password: password.value, role: role.value,
      hospital_id: role.value === 'hospital_admin' ? Number(hospital.value) : null,
    };
    try {
      const user = await busy(submit, () => POST('/v1/users', body));
      if (!page.active) return;
      form.reset();
      syncHospital();
      announce(`User ${user.email} created`);
      await load();
    } catch (e) {
      if (e instanceof ApiError && e.status === 409) errors.field(email, e.message);
      else showApiError(errors, e, (f) => ({ email, password, role, hospital_id: hospital })[f]);
    }
  }));

  document.getElementById('main').append(pageHeading('Users'),
    h('section', { class: 'panel', 'aria-labelledby': 'new-user-heading' },
      h('h2', { id: 'new-user-heading' }, 'New user'), form),
    h('section', { 'aria-label': 'All users' }, list));
  load().catch((e) => e instanceof SessionEnded || patch(list, loadError(e)));
}

function auditPage(page) {
  const list = h('div', { class: 'list' }, loading());
  document.getElementById('main').append(pageHeading('Audit log'),
    h('p', { class: 'lede' }, 'Every change to users, hospitals, agents and jobs, newest first (last 200).'), list);
  GET('/v1/audit?limit=200').then((entries) => {
    if (!page.active) return;
    patch(list, entries.length === 0 ? h('p', { class: 'empty' }, 'Nothing has been audited yet.') : dataTable({
      id: 'audit-table', caption: 'Audit log',
      columns: ['When', 'Actor', 'Action', 'Target', 'Details'],
      rows: entries.map((a) => [timeEl(a.at), a.actor, h('code', {}, a.action), a.target,
        h('code', { class: 'detail' }, fmtDetail(a.detail))]),
    }));
  }).catch((e) => e instanceof SessionEnded || patch(list, loadError(e)));
}

function allJobsPage(page) {
  const list = h('div', { class: 'list' }, loading());
  const live = liveLine('jobs-live');
  document.getElementById('main').append(pageHeading('Jobs'), live.el, list);
  poller(page, async () => {
    const jobs = await GET('/v1/jobs');
    if (!page.active) return;
    patchIfChanged(list, jobs, () => jobsTable(jobs, 'No jobs have been created yet.'));
    live.ok('Updated');
  }, 5000, live.error);
}

// ---------------------------------------------------------------------------------------------
// Hospital admin: agents and enrolment, consent

function agentStatus(agent) {
  if (agent.revoked_at) return badge('revoked');
  return agent.online ? badge('online') : badge('offline');
}

function agentsPage(page) {
  const list = h('div', { class: 'list' }, loading());
  const live = liveLine('agents-live');
  const tokenPanel = h('div', { id: 'enrol-panel', hidden: true });
  const createButton = h('button', { type: 'button', id: 'create-token' }, 'Create enrolment token');
  let agentsPoll = null;

  createButton.addEventListener('click', guard(async () => {
    const token = await busy(createButton, () => POST('/v1/enrolment-tokens', {}));
    if (!page.active) return;
    showToken(tokenPanel, token);
    announce('Enrolment token created');
  }));

  async function remove(agent) {
    if (!window.confirm(`Delete agent ${agent.name}? It has never connected; its credential stops working and the weights sealed to it are deleted.`)) return;
    await api('DELETE', `/v1/agents/${agent.id}`);
    if (!page.active) return;
    announce(`Agent ${agent.name} deleted`);
    agentsPoll?.refresh();
  }

  // An agent that never connected (its enrolment could not write its state, say) can be
  // deleted; one that has connected stays on record and is revoked.
  const action = (a) => {
    if (a.last_seen_at == null) {
      return h('button', {
        type: 'button', class: 'button-danger small', 'data-focus-key': `delete-${a.id}`, onclick: guard(() => remove(a)),
      }, 'Delete', srOnly(` ${a.name}`));
    }
    if (a.revoked_at) return '—';
    return h('button', {
      type: 'button', class: 'button-danger small', 'data-focus-key': `revoke-${a.id}`, onclick: guard(() => revoke(a)),
    }, 'Revoke', srOnly(` ${a.name}`));
  };

  async function revoke(agent) {
    if (!window.confirm(`Revoke agent ${agent.name}? It can no longer claim visits; a visit it is running will be retried.`)) return;
    await POST(`/v1/agents/${agent.id}/revoke`);
    if (!page.active) return;
    announce(`Agent ${agent.name} revoked`);
    agentsPoll?.refresh();
  }

  const renderAgents = (agents) => (agents.length === 0
    ? h('p', { class: 'empty' }, 'No agents enrolled yet. Create an enrolment token and run its command on a machine at your hospital.')
    : dataTable({
      id: 'agents-table', caption: 'Agents',
      columns: ['Name', 'Status', 'Version', 'Key fingerprint', 'Last seen', 'Current visit', 'Enrolled', 'Actions'],
      rows: agents.map((a) => [a.name, agentStatus(a), a.version || '—', h('code', { class: 'fingerprint' }, a.key_fingerprint),
        agoEl(a.last_seen_at), a.current_visit == null ? '—' : `visit ${a.current_visit}`, timeEl(a.enrolled_at), action(a)]),
    }));

  document.getElementById('main').append(pageHeading('Agents'),
    h('p', { class: 'lede' }, `The training daemons of ${session.me.hospital ?? 'your hospital'}. Each one enrols once with a one-time token. `,
      'Other hospitals’ agents pin each key the first time they see it: compare fingerprints with ', h('code', {}, 'medsplit-agent keys'), ' out of band.'),
    h('div', { class: 'toolbar' }, createButton), tokenPanel, live.el, list, privacyBudget(page));

  agentsPoll = poller(page, async () => {
    const agents = await GET('/v1/agents');
    if (!page.active) return;
    patch(list, renderAgents(agents)); // always: the "last seen" times move on
    live.ok();
  }, 3000, live.error);
}

/** The hospital's maximum ε per job: consent to a job over it is refused, and agents refuse to train past it. */
function privacyBudget(page) {
  const max = input('max-epsilon', 'max_epsilon', { inputmode: 'decimal', autocomplete: 'off' });
  const save = h('button', { type: 'submit', id: 'save-max-epsilon' }, 'Save maximum');
  const current = h('p', { class: 'meta', id: 'max-epsilon-current' }, loading());
  const form = h('form', { id: 'max-epsilon-form', class: 'stack', novalidate: true },
    field('Maximum ε per job', max, 'Leave empty for no maximum. A job whose projected ε for your hospital is higher cannot be approved, and your agents refuse to train past it.'),
    h('div', { class: 'actions' }, save));
  const errors = formErrors(form);
  const show = (value) => {
    current.textContent = value == null ? 'No maximum is set: any job can be approved, with or without differential privacy.'
      : `At most ε = ${value} per job; jobs without differential privacy cannot be approved.`;
  };
  form.addEventListener('submit', guard(async (event) => {
    event.preventDefault();
    errors.clear();
    const text = max.value.trim();
    const value = text === '' ? null : Number(text);
    if (value !== null && !(Number.isFinite(value) && value > 0)) {
      errors.field(max, 'Enter a positive number, or leave it empty for no maximum.');
      return;
    }
    try {
      const hospital = await busy(save, () => api('PUT', `/v1/hospitals/${session.me.hospital_id}/max-epsilon`, { max_epsilon: value }));
      if (!page.active) return;
      show(hospital.max_epsilon);
      announce(hospital.max_epsilon == null ? 'Maximum ε removed' : `Maximum ε set to ${hospital.max_epsilon}`);
    } catch (e) {
      showApiError(errors, e, (f) => ({ max_epsilon: max })[f]);
    }
  }));
  GET('/v1/hospitals').then((all) => {
    if (!page.active) return;
    const mine = all.find((x) => x.id === session.me.hospital_id);
    max.value = mine?.max_epsilon ?? '';
    show(mine?.max_epsilon ?? null);
  }).catch((e) => { current.textContent = errorText(e); });
  return h('section', { class: 'panel budget', 'aria-labelledby': 'budget-heading' },
    h('h2', { id: 'budget-heading' }, 'Privacy budget'), current, form);
}

function showToken(panel, token) {
  const code = h('code', { id: 'enrol-command' }, token.command);
  const pre = h('pre', { class: 'command' }, code);
  const copyStatus = h('span', { class: 'copy-status' });
  const copy = h('button', { type: 'button', id: 'copy-command' }, 'Copy command');
  const say = (text) => {
    copyStatus.textContent = text;
    announce(text);
  };
  copy.addEventListener('click', async () => {
    try {
      await navigator.clipboard.writeText(token.command);
      say('Command copied');
    } catch {
      // No clipboard access (insecure origin, or permission denied): select the text instead.
      const range = document.createRange();
      range.selectNodeContents(code);
      window.getSelection().removeAllRanges();
      window.getSelection().addRange(range);
      say('Command selected: press Ctrl+C (⌘C on a Mac) to copy it');
    }
  });
  panel.hidden = false;
  panel.className = 'panel token-panel';
  panel.replaceChildren(
    h('h2', {}, 'Enrol an agent'),
    h('p', {}, h('strong', {}, 'This token is shown only once.'), ' It expires at ', timeEl(token.expires_at), '.'),
    h('ol', { class: 'steps' },
      h('li', {}, h('p', {}, 'On the machine that will host the agent, as the user it will run as (',
        h('code', {}, 'medsplit-agent'), ', owner of the state directory), run:'),
      pre, h('div', { class: 'actions' }, copy, copyStatus)),
      h('li', {}, h('p', {}, 'Write its configuration, ', h('code', {}, AGENT_CONFIG),
        ': the state directory and the hospital’s beats, for example:'),
      h('pre', { class: 'config', id: 'agent-config' }, h('code', {}, AGENT_CONFIG_EXAMPLE))),
      h('li', {}, h('p', {}, 'Start it with ', h('code', { id: 'agent-run' }, `medsplit-agent run --config ${AGENT_CONFIG}`),
        ' (or the systemd unit ', h('code', {}, 'medsplit-agent.service'),
        '). It shows below as Online once it runs. The operations guide lists every source format and setting.'))),
  );
}

const AGENT_CONFIG = '/etc/medsplit/agent.toml';
const AGENT_CONFIG_EXAMPLE = `state_dir = "/var/lib/medsplit-agent"

[[sources]]
format = "beats"          # or "csv", "wfdb", "synthetic"
path = "/data/mitbih"
`;

function myEntry(job) {
  return job.hospitals.find((x) => x.hospital_id === session.me?.hospital_id);
}

function consentPage(page) {
  const pendingBox = h('div', { class: 'cards' }, loading());
  const othersBox = h('div', { class: 'list' }, loading());
  const live = liveLine('consent-live');
  let consentPoll = null;

  async function decide(job, decision) {
    if (decision === 'decline' && !window.confirm(`Decline job ${job.name}? It will not run.`)) return;
    const updated = await POST(`/v1/jobs/${job.id}/consent`, { decision });
    if (!page.active) return;
    announce(decision === 'approve'
      ? `Job ${job.name} approved${updated.status === 'running' ? '; it is running now' : ''}`
      : `Job ${job.name} declined`);
    consentPoll?.refresh();
  }

  const consentCard = (job) => h('section', { class: 'card', 'aria-labelledby': `job-${job.id}-title` },
    h('h3', { id: `job-${job.id}-title` }, job.name),
    // Names may repeat: the job's number and its researcher tell jobs apart.
    h('p', { class: 'meta requested' }, `Job ${job.id}, requested by `, h('strong', {}, job.owner), ' on ',
      timeEl(job.created_at)),
    job.spec.insecure_plaintext ? h('p', { class: 'warning' }, h('strong', {}, 'Plaintext (HE off): '),
      'this job turns encryption off. The coordinator would see your hospital’s activations and gradients.') : null,
    job.spec.init_from ? h('p', { class: 'notice', id: `job-${job.id}-source` }, h('strong', {}, 'Transfer learning: '),
      `this job starts from ${sourceText(job)}.`) : null,
    specSummary(job.spec, job.network, job.source),
    epsilonTable(job, `job-${job.id}-epsilon`),
    agentApproval(job),
    consentList(job),
    h('div', { class: 'actions' },
      h('button', { type: 'button', 'data-focus-key': `approve-${job.id}`, onclick: guard(() => decide(job, 'approve')) },
        'Approve', srOnly(` ${job.name}`)),
      h('button', { type: 'button', class: 'button-danger', 'data-focus-key': `decline-${job.id}`, onclick: guard(() => decide(job, 'decline')) },
        'Decline', srOnly(` ${job.name}`))));

  function renderJobs(jobs) {
    const isPending = (j) => j.status === 'pending' && myEntry(j)?.consent === 'pending';
    const pending = jobs.filter(isPending);
    const others = jobs.filter((j) => !isPending(j));
    patchIfChanged(pendingBox, pending, () => (pending.length === 0
      ? h('p', { class: 'empty' }, 'No job is waiting for your decision.')
      : pending.map(consentCard)));
    patchIfChanged(othersBox, others, () => (others.length === 0
      ? h('p', { class: 'empty' }, 'No other jobs name your hospital.')
      : dataTable({
        id: 'hospital-jobs-table', caption: 'Other jobs naming your hospital',
        columns: ['Job', 'Status', 'Your decision', 'Progress', 'Created'],
        rows: others.map((j) => [h('a', { href: `/jobs/${j.id}`, 'data-focus-key': `job-${j.id}` }, j.name), badge(j.status),
          badge(myEntry(j)?.consent ?? 'pending'), `${j.visits_done} / ${j.visits_total}`, timeEl(j.created_at)]),
      })));
  }

  document.getElementById('main').append(pageHeading('Job consent'),
    h('p', { class: 'lede' }, 'A job only runs once every hospital it names has approved it. Training data stays at your hospital; only encrypted activations leave it.'),
    live.el,
    h('section', { 'aria-labelledby': 'pending-heading' }, h('h2', { id: 'pending-heading' }, 'Awaiting your decision'), pendingBox),
    h('section', { 'aria-labelledby': 'others-heading' }, h('h2', { id: 'others-heading' }, 'Other jobs'), othersBox));

  consentPoll = poller(page, async () => {
    const jobs = await GET('/v1/jobs');
    if (!page.active) return;
    renderJobs(jobs);
    live.ok();
  }, 5000, live.error);
}

/**
 * What the hospital's agents check themselves: the job approved on their host (its digest),
 * and the keys of the agents the weights are sealed to.
 */
function agentApproval(job) {
  return h('div', { class: 'agent-approval', id: `job-${job.id}-agents` },
    h('p', { class: 'notice' }, h('strong', {}, 'Approve at your agents too: '),
      'they train only jobs approved on their own host. Run ', h('code', {}, `medsplit-agent approve ${job.id}`),
      ' there; it shows the job as your agent receives it, with the digest ',
      h('code', { class: 'digest' }, job.digest), '. Do not approve if the two differ.'),
    dataTable({
      id: `job-${job.id}-keys`, caption: 'Agents the model’s client layers are sealed to',
      columns: ['Hospital', 'Agent', 'Key fingerprint'],
      rows: job.agents.filter((a) => a.active).map((a) => [a.hospital, `${a.name} (${a.id})`,
        h('code', { class: 'fingerprint' }, a.key_fingerprint)]),
    }));
}

// ---------------------------------------------------------------------------------------------
// Jobs: shared pieces

/**
 * Where a job's weights start: a finished job's model (its final server layer and each
 * hospital's client weights from it), and which layers train.
 */
function sourceText(job) {
  const spec = job.spec;
  const name = job.source ? ` (${job.source.name})` : '';
  const start = `job ${spec.init_from}${name}: its final server layer and the client weights your hospital holds from it`;
  return spec.train_client === false
    ? `${start}; server layer only: your client layers stay as they are, and no gradients come back to your hospital`
    : `${start}; every layer trains`;
}

/** What a job asks of each hospital: its network, where each layer runs, how it trains. */
function specSummary(spec, network, source) {
  const opt = spec.server_optimizer ?? { kind: 'adam', lr: 0.001 };
  const items = [
    ['Labels', LABEL_SET_LABELS[spec.labels ?? 'aami'] ?? spec.labels],
    ...inputItems(network),
    ['Model', modelLabel(spec.model)],
    ['Initial weights', spec.init_from ? `From ${sourceText({ spec, source })}` : `Drawn from the seed (${spec.seed})`, true],
    ...networkItems(spec.model, network),
    ['Hospitals, in visit order', h('ol', { class: 'inline-list' }, spec.hospitals.map((n) => h('li', {}, n)))],
    ['Rounds', spec.rounds],
    ['Local work per visit', localWork(spec)],
    ['Batch size', spec.batch_size],
    ['Batches in flight', inFlightText(spec.batches_in_flight ?? 1)],
    ['Class weights', classWeightsText(spec.class_weights)],
    ['Client learning rate', `Adam, ${spec.client_lr ?? 0.001}`],
    ['Test accuracy', `every ${spec.eval_every === 1 ? 'round' : `${spec.eval_every} rounds`} and after the last`],
    ['Seed', spec.seed],
    ['Server optimiser', `${OPTIMIZER_LABELS[opt.kind] ?? opt.kind}, learning rate ${opt.lr}`],
    ['Attempts per visit', spec.max_attempts],
    ['When a visit keeps failing', FAILURE_LABELS[spec.on_failure] ?? spec.on_failure],
    ['Encryption', encryptionBadge(spec)],
    ['Who may take the finished model', RELEASE_LABELS[spec.release ?? 'participants'] ?? spec.release, true],
    ['Differential privacy', dpText(spec), true],
  ];
  return h('dl', { class: 'spec' }, items.map(([k, v, wide]) =>
    h('div', { class: wide ? 'wide' : null }, h('dt', {}, k), h('dd', {}, v))));
}

/** How many training batches a visit keeps in flight, and what it means for the weights. */
function inFlightText(k) {
  return k === 1
    ? '1: each batch waits for the one before it'
    : `${k}: a hospital sends up to ${k} batches before their replies arrive; each batch trains through layers up to ${k - 1} batches old`;
}

/** A job's differential privacy in a sentence. */
function dpText(spec) {
  const dp = spec.dp;
  if (!dp) return 'None: no ε bounds what the coordinator and the next hospital can learn from the training';
  const noise = dp.noise_multiplier != null
    ? `noise multiplier σ = ${dp.noise_multiplier}`
    : `σ chosen by each hospital's agent for ε = ${dp.target_epsilon}`;
  return `DP-SGD: each step a Poisson sample (expected ${spec.batch_size} beats), each beat's gradient clipped to ${dp.clip_norm}, ${noise}, δ = ${dp.delta}`;
}

/** How each hospital cuts its beats for the job (from the API's view of the network). */
function inputItems(network) {
  if (!network) return [];
  const features = network.features
    ? `, then ${network.features} RR-interval features`
    : '';
  return [
    ['Preprocessing', PREPROCESSING_LABELS[network.preprocessing] ?? network.preprocessing],
    ['Input per beat', `${network.beat_len} samples${features}`],
  ];
}

/** The layers of a job's network (the spec's model table and the API's shapes of it). */
function networkItems(model, network) {
  if (!model || typeof model !== 'object' || !network) return [];
  const blocks = (model.blocks ?? []).map((b) => `${b.channels} channels, kernel ${b.kernel}, pool ${b.pool}`);
  return [
    ['Convolution blocks (at the hospital)', blocks.join('; '), true],
    ['Cut layer', `${network.cut_width} values per beat, encrypted`],
    ['Coordinator’s layer', `Linear ${network.cut_width} → ${network.server_outputs}, on ciphertexts`],
    ['Client tail (at the hospital)', model.tail
      ? `LeakyReLU, Linear ${model.tail} → ${network.classes} classes`
      : `None: the coordinator’s layer gives the ${network.classes} class scores`],
  ];
}

function localWork(spec) {
  if (spec.local_steps != null) {
    const beats = spec.local_steps * spec.batch_size;
    return `${spec.local_steps} batch${spec.local_steps === 1 ? '' : 'es'} (${beats} beats), continuing through the data from visit to visit`;
  }
  const n = spec.local_epochs;
  return `${n} pass${n === 1 ? '' : 'es'} over the hospital’s training data`;
}

function classWeightsText(weights) {
  if (weights == null || weights === 'uniform') return 'Uniform';
  if (weights === 'balanced') return 'Balanced: each hospital weighs its classes inversely to their frequency';
  if (Array.isArray(weights.fixed)) return `Fixed: ${weights.fixed.join(', ')} (in the label set’s order)`;
  return JSON.stringify(weights);
}

/** ε with two decimals, or why there is none. */
const fmtEps = (x) => (x == null ? '—' : x.toFixed(2));

/** Each hospital's ε on a job: projected before consent, spent after each visit, its maximum. */
function epsilonTable(job, id) {
  if (!job.spec.dp) {
    return h('p', { class: 'warning', id }, h('strong', {}, 'No differential privacy: '),
      'nothing bounds what the coordinator and the next hospital can learn from the training (ε is unbounded).');
  }
  const projected = (x) => (x.projected_epsilon == null
    ? h('span', { class: 'meta' }, x.projection_note ?? '—')
    : `${fmtEps(x.projected_epsilon)}${x.noise_multiplier == null ? ' (target)' : ` (σ ${x.noise_multiplier.toFixed(3)})`}`);
  const over = (x) => x.max_epsilon != null && (x.projected_epsilon == null || x.projected_epsilon > x.max_epsilon);
  return dataTable({
    id, caption: `ε per hospital over the whole job (δ = ${job.spec.dp.delta})`, rowHeaders: true,
    columns: ['Hospital', 'Training beats', 'Projected ε', 'ε spent', 'Maximum ε'],
    rows: job.privacy.map((x) => [x.hospital, fmtCount(x.train_samples), projected(x), fmtEps(x.epsilon_spent),
      x.max_epsilon == null ? 'none' : h('span', { class: over(x) ? 'error-text' : null },
        `${x.max_epsilon}${over(x) ? ' (exceeded: approval is refused)' : ''}`)]),
  });
}

/** The privacy report of a job: what the coordinator saw, the attacks' figures, DP's cost. */
function privacyView(job, report) {
  if (!report) return loading();
  const seen = report.seen.length === 0
    ? h('p', { class: 'empty' }, 'No visit has completed yet.')
    : dataTable({
      id: 'privacy-seen', caption: 'What the coordinator received (up) and sent (down)', rowHeaders: true,
      columns: ['Message', 'Direction', 'Count', 'Bytes', 'What it carries'],
      rows: report.seen.map((m) => [m.kind, m.direction, fmtCount(m.count), fmtMB(m.bytes), m.carries]),
    });
  const a = report.attack;
  const attack = dataTable({
    id: 'privacy-attack',
    caption: `The attack harness at batch size ${a.measured_batch_size}${a.dp ? `, with DP (ε ${fmtEps(a.measured_epsilon)})` : ', without DP'}`,
    rowHeaders: true,
    columns: ['Coordinator', 'Training', 'Median centered cosine', 'Recovered > 0.9', 'Labels recovered', 'kNN accuracy', 'Majority class'],
    rows: a.results.map((r) => [r.attacker, r.window === 'later' ? 'later steps' : 'first steps', r.cosine_median.toFixed(3),
      fmtPct(r.recovered_share), fmtPct(r.label_recovery), fmtPct(r.knn_accuracy), fmtPct(r.majority_rate)]),
  });
  const acc = report.accuracy;
  const row = (name, x) => [name, fmtPct(x.accuracy), fmtPct(x.majority_rate), x.macro_f1?.toFixed(3) ?? '—',
    x.classes?.map((c) => `${c.name} ${(c.sensitivity * 100).toFixed(1)} / ${(c.ppv * 100).toFixed(1)}`).join(', ') ?? '—'];
  const accuracy = dataTable({
    id: 'privacy-accuracy', caption: `DP's cost on new patients: ${acc.task ?? 'the inter-patient benchmark'}`, rowHeaders: true,
    columns: ['Training', 'Accuracy', 'Majority class', 'Macro-F1', 'Se / PPV per class'],
    rows: [row('Without DP', acc.without_dp), row(`With DP (ε ${acc.with_dp.epsilon ?? '—'})`, acc.with_dp)],
  });
  return [
    h('h3', {}, 'ε per hospital'), epsilonTable(job, 'privacy-epsilon'),
    h('h3', {}, 'What the coordinator saw'),
    h('p', { class: 'meta' }, report.encrypted
      ? 'Activations and the gradients it returns are encrypted; the summed gradient of its own layer arrives in plaintext.'
      : 'Encryption is off: the coordinator sees activations and gradients in plaintext.'),
    seen,
    h('h3', {}, 'What an attacker recovers from it'),
    h('p', { class: 'meta' }, 'Measured on MIT-BIH with exactly what the coordinator receives, centered cosine against the true activations; an honest-but-curious coordinator and one that chooses its weights to isolate one beat.'),
    attack,
    h('h3', {}, 'What DP costs'), accuracy,
  ];
}

function consentList(job) {
  return h('ul', { class: 'consent-list', 'aria-label': 'Consent of each hospital' },
    job.hospitals.map((x) => h('li', {}, h('span', { class: 'name' }, x.name), ' ',
      badge(x.consent, x.consent === 'pending' ? 'Waiting for consent' : null),
      x.decided_at ? h('span', { class: 'meta' }, ' ', timeEl(x.decided_at)) : null)));
}

function waitingFor(job) {
  return job.hospitals.filter((x) => x.consent === 'pending').map((x) => x.name);
}

/** One line saying what a job is doing now. */
function jobActivity(job) {
  switch (job.status) {
    case 'pending': {
      const names = waitingFor(job);
      return names.length ? `Waiting for consent of ${names.join(', ')}` : 'Starting';
    }
    case 'running': {
      const c = job.current;
      if (!c) return 'Scheduling the next visit';
      const where = `Round ${c.round + 1} of ${job.spec.rounds} at ${c.hospital}`;
      return c.status === 'queued' ? `${where}: waiting for an agent` : `${where}: training, ${wholePct(c.progress)}`;
    }
    case 'declined': {
      const by = job.hospitals.filter((x) => x.consent === 'declined').map((x) => x.name);
      return by.length ? `Declined by ${by.join(', ')}` : 'Declined';
    }
    case 'failed':
      return job.error ? `Failed: ${job.error}` : 'Failed';
    default: {
      const label = STATUS_LABELS[job.status] ?? job.status;
      return job.finished_at ? `${label} ${fmtDate(job.finished_at)}` : label;
    }
  }
}

function jobsTable(jobs, emptyText) {
  if (jobs.length === 0) return h('p', { class: 'empty' }, emptyText);
  return dataTable({
    id: 'jobs-table', caption: 'Jobs',
    columns: ['Name', 'Status', 'Progress', 'Now', 'Created'],
    rows: jobs.map((j) => [h('a', { href: `/jobs/${j.id}`, 'data-focus-key': `job-${j.id}` }, j.name), badge(j.status),
      h('span', { class: 'progress-cell' },
        h('progress', { max: j.visits_total || 1, value: j.visits_done, 'aria-label': `${j.name}: visits done` }),
        ` ${j.visits_done} / ${j.visits_total}`),
      jobActivity(j), timeEl(j.created_at)]),
  });
}

function jobsPage(page) {
  const list = h('div', { class: 'list' }, loading());
  const live = liveLine('jobs-live');
  document.getElementById('main').append(
    h('div', { class: 'page-head' }, pageHeading('Jobs'), h('a', { href: '/jobs/new', class: 'button', id: 'new-job-link' }, 'New job')),
    live.el, list);
  poller(page, async () => {
    const jobs = await GET('/v1/jobs');
    if (!page.active) return;
    patchIfChanged(list, jobs, () => jobsTable(jobs, 'No jobs yet. Create one to start training across hospitals.'));
    live.ok();
  }, 5000, live.error);
}

// ---------------------------------------------------------------------------------------------
// New job form

const INT_FIELDS = [
  // [JobSpec field, id, label, default, min, max, hint]
  ['rounds', 'job-rounds', 'Rounds', 3, 1, 1000, 'Each round visits every hospital once, in order.'],
  ['local_epochs', 'job-local-epochs', 'Local epochs', 1, 1, 100, 'Passes over a hospital’s training data per visit.'],
  ['local_steps', 'job-local-steps', 'Local steps', 100, 1, 1000000, 'Batches per visit; the next visit goes on through the data where this one stopped.'],
  ['batch_size', 'job-batch-size', 'Batch size', 4, 1, 256, 'Samples per encrypted batch (1–256).'],
  ['batches_in_flight', 'job-batches-in-flight', 'Batches in flight', 4, 1, 32, 'Batches a hospital sends before the first one’s reply arrives (1–32): more hides the network’s round trips, each batch then trains through layers that many batches old. 1 with DP or server-only training.'],
  ['eval_every', 'job-eval-every', 'Evaluate every (rounds)', 1, 1, 1000, 'Test accuracy is also measured after the last round.'],
  ['max_attempts', 'job-max-attempts', 'Attempts per visit', 3, 1, 20, 'Tries a visit gets before the failure policy applies.'],
];

/** A whole number typed in a box, or the raw text (so the server names the field). */
function parseInteger(text) {
  return /^\s*\d+\s*$/.test(text) ? Number(text) : text;
}

/** The largest seed (JobSpec::MAX_SEED, 2^53 − 1): larger whole numbers are not exact in JSON. */
const MAX_SEED = 9007199254740991n;

/**
 * A seed typed in a box: a number when JSON carries it exactly, else the text as typed (the
 * form refuses larger whole numbers; the server names anything else).
 */
function parseSeed(text) {
  const digits = text.trim();
  return /^\d+$/.test(digits) && BigInt(digits) <= MAX_SEED ? Number(digits) : text;
}

function parseDecimal(text) {
  const n = Number(text);
  return text.trim() !== '' && Number.isFinite(n) ? n : text;
}

function newJobPage(page) {
  const name = input('job-name', 'name', { autocomplete: 'off', maxlength: '200' });
  const model = select('job-model', 'model', Object.entries(MODEL_LABELS), 'm1');
  const labels = select('job-labels', 'labels', Object.entries(LABEL_SET_LABELS), 'aami');
  const preprocessing = select('job-preprocessing', 'preprocessing', Object.entries(PREPROCESSING_LABELS), 'papers');
  const ints = Object.fromEntries(INT_FIELDS.map(([key, id, , def]) =>
    [key, input(id, key, { inputmode: 'numeric', value: def, autocomplete: 'off' })]));
  const seed = input('job-seed', 'seed', { inputmode: 'numeric', value: '0', autocomplete: 'off' });
  const optimizer = select('job-optimizer', 'server_optimizer', [['adam', 'Adam'], ['sgd', 'SGD']], 'adam');
  const lr = input('job-lr', 'server_optimizer.lr', { inputmode: 'decimal', value: '0.001', autocomplete: 'off' });
  const onFailure = select('job-on-failure', 'on_failure', Object.entries(FAILURE_LABELS), 'skip');
  const release = select('job-release', 'release', Object.entries(RELEASE_LABELS), 'participants');
  const insecure = h('input', { type: 'checkbox', id: 'job-insecure', name: 'insecure_plaintext' });
  const insecureWarning = h('p', { class: 'warning', id: 'job-insecure-warning', hidden: true },
    'Activations and gradients will travel unencrypted: the coordinator could see them. Use this only with synthetic data.');
  insecure.addEventListener('change', () => { insecureWarning.hidden = !insecure.checked; });
  const initFrom = input('job-init-from', 'init_from', { inputmode: 'numeric', autocomplete: 'off' });
  const serverOnly = h('input', { type: 'checkbox', id: 'job-server-only', name: 'train_client' });
  const picker = hospitalPicker();
  const submit = h('button', { type: 'submit', id: 'job-submit' }, 'Submit job');
  const clientLr = input('job-client-lr', 'client_lr', { inputmode: 'decimal', value: '0.001', autocomplete: 'off' });
  const classWeights = select('job-class-weights', 'class_weights', Object.entries(CLASS_WEIGHT_LABELS), 'uniform');
  const work = select('job-local-work', 'local_work', Object.entries(LOCAL_WORK_LABELS), 'epochs');
  const intFields = Object.fromEntries(INT_FIELDS.map(([key, , label, , , , hint]) => [key, field(label, ints[key], hint)]));
  const steps = () => work.value === 'steps';
  const syncWork = () => {
    intFields.local_epochs.hidden = steps();
    intFields.local_steps.hidden = !steps();
  };
  work.addEventListener('change', syncWork);
  syncWork();

  const form = h('form', { id: 'job-form', class: 'job-form', novalidate: true },
    h('fieldset', { class: 'group' }, h('legend', {}, 'Job'),
      h('div', { class: 'form-grid' }, field('Name', name),
        field('Model', model, 'M1: two convolution blocks at the hospital, one encrypted linear layer at the coordinator. The tail adds LeakyReLU and a linear layer at the hospital after it.'),
        field('Label set', labels, 'The classes every hospital labels its beats with. AAMI: normal, supraventricular, ventricular, fusion, unclassifiable.'),
        field('Preprocessing', preprocessing, 'How every hospital cuts its beats. Pre-cut beat files hold the papers’ preprocessing; the inter-patient one adds four RR-interval features to the encrypted cut layer.'))),
    picker.el,
    h('fieldset', { class: 'group' }, h('legend', {}, 'Start from a finished job (optional)'),
      h('div', { class: 'form-grid' },
        field('Finished job', initFrom, 'Its number: the new job starts from its model. Same model, label set and preprocessing; every hospital above must have taken part in it.')),
      checkField('Train only the server layer (the hospitals’ client layers stay as they are)', serverOnly)),
    h('fieldset', { class: 'group' }, h('legend', {}, 'Training'),
      h('div', { class: 'form-grid' }, intFields.rounds,
        field('Local work per visit', work, 'Shorter visits and more rounds help hospitals with different class mixes.'),
        intFields.local_epochs, intFields.local_steps, intFields.batch_size, intFields.batches_in_flight, intFields.eval_every,
        field('Class weights', classWeights, 'Uniform: every class weighs 1. Balanced: each hospital weighs its classes inversely to their frequency in its own data.'),
        field('Client learning rate', clientLr, 'The hospitals’ Adam: greater than 0, at most 1.'),
        field('Seed', seed, `Seeds the initial weights and the data order: 0 to ${MAX_SEED}.`),
        field('Server optimiser', optimizer), field('Server learning rate', lr, 'Greater than 0, at most 1.'))),
    h('fieldset', { class: 'group' }, h('legend', {}, 'Failures and security'),
      h('div', { class: 'form-grid' }, intFields.max_attempts, field('When a visit keeps failing', onFailure),
        field('Who may take the finished model', release, 'Exports are audited and listed on the job’s page. With “nobody”, hospitals classify new beats only through private inference.')),
      checkField('Turn off encryption (insecure plaintext, for debugging only)', insecure), insecureWarning),
    h('div', { class: 'actions' }, submit));
  const errors = formErrors(form);

  const spec = () => ({
    name: name.value,
    model: model.value,
    labels: labels.value,
    preprocessing: preprocessing.value,
    hospitals: picker.order(),
    // Epochs or steps: the other count is left out (the API's default).
    ...Object.fromEntries(INT_FIELDS.filter(([key]) => key !== (steps() ? 'local_epochs' : 'local_steps'))
      .map(([key]) => [key, parseInteger(ints[key].value)])),
    client_lr: parseDecimal(clientLr.value),
    class_weights: classWeights.value,
    seed: parseSeed(seed.value),
    server_optimizer: { kind: optimizer.value, lr: parseDecimal(lr.value) },
    on_failure: onFailure.value,
    release: release.value,
    insecure_plaintext: insecure.checked,
    init_from: initFrom.value.trim() === '' ? null : parseInteger(initFrom.value),
    train_client: !serverOnly.checked,
    // Server-only training goes one batch at a time.
    ...(serverOnly.checked ? { batches_in_flight: 1 } : {}),
  });

  // Where a field path of the API points in this form.
  const locate = (path) => {
    if (path === 'hospitals' || path.startsWith('hospitals[')) {
      const i = Number(path.match(/\[(\d+)\]/)?.[1]);
      return { el: picker.fieldset, focus: picker.focusTarget(Number.isNaN(i) ? null : i) };
    }
    if (path === 'model' || path.startsWith('model.')) return model;
    if (path === 'preprocessing' || path.startsWith('preprocessing.')) return preprocessing;
    const controls = { name, model, labels, seed, on_failure: onFailure, release, insecure_plaintext: insecure, ...ints,
      init_from: initFrom, train_client: serverOnly,
      client_lr: clientLr, class_weights: classWeights,
      'server_optimizer.lr': lr, 'server_optimizer.kind': optimizer, server_optimizer: optimizer };
    return controls[path] ?? null;
  };

  form.addEventListener('submit', guard(async (event) => {
    event.preventDefault();
    errors.clear();
    const body = spec();
    const found = validateSpec(body);
    if (found.length) {
      for (const [path, message] of found) showAt(errors, locate(path), message);
      return;
    }
    try {
      const job = await busy(submit, () => POST('/v1/jobs', body));
      navigate(`/jobs/${job.id}`);
      announce(`Job ${job.name} created`);
    } catch (e) {
      if (!(e instanceof SessionEnded)) showApiError(errors, e, locate);
    }
  }));

  document.getElementById('main').append(pageHeading('New job'),
    h('p', { class: 'lede' }, 'The job waits until every hospital you choose has approved it, then visits them in the order below, round after round.'),
    form);

  GET('/v1/hospitals').then((hospitals) => {
    if (page.active) picker.setHospitals(hospitals.filter((x) => !x.disabled));
  }).catch((e) => e instanceof SessionEnded || errors.form(`Could not load the hospitals: ${errorText(e)}`));
}

/**
 * Why the API refuses `text` (as its central text check words it), or null: control and
 * formatting characters (bidirectional overrides, zero-width characters, …) let one name pass
 * for another on screen.
 */
function refusedText(text) {
  const chars = [...text];
  const at = chars.findIndex((c) => /[\p{Cc}\p{Cf}\u2028\u2029]/u.test(c));
  if (at < 0) return null;
  const code = chars[at].codePointAt(0).toString(16).toUpperCase().padStart(4, '0');
  return `must not contain control or formatting characters (U+${code} at character ${at + 1})`;
}

/**
 * The same checks as JobSpec::validate on the server, with the same messages, for the fields
 * that parsed; what did not parse is left for the server to name.
 */
function validateSpec(spec) {
  const found = [];
  const bytes = new TextEncoder().encode(spec.name).length;
  if (spec.name.trim() === '' || bytes > 200) found.push(['name', 'must be 1 to 200 characters']);
  else if (refusedText(spec.name)) found.push(['name', refusedText(spec.name)]);
  if (spec.hospitals.length === 0 || spec.hospitals.length > 64) found.push(['hospitals', 'must name 1 to 64 hospitals']);
  for (const [key, , , , lo, hi] of INT_FIELDS) {
    const v = spec[key];
    if (typeof v === 'number' && v <= 0xffffffff && (v < lo || v > hi)) {
      found.push([key, `must be between ${lo} and ${hi}, got ${v}`]);
    }
  }
  if (typeof spec.seed === 'string' && /^\s*\d+\s*$/.test(spec.seed)) {
    found.push(['seed', `must be between 0 and ${MAX_SEED} (2^53 - 1), got ${BigInt(spec.seed.trim())}`]);
  }
  for (const [path, rate] of [['server_optimizer.lr', spec.server_optimizer.lr], ['client_lr', spec.client_lr]]) {
    if (typeof rate === 'number' && !(rate > 0 && rate <= 1)) found.push([path, `must be in (0, 1], got ${rate}`]);
  }
  return found;
}

/** The hospitals of a job: a checkbox each, and the chosen ones in visit order. */
function hospitalPicker() {
  let hospitals = [];
  let order = []; // names, in visit order
  const choices = h('div', { class: 'choices' }, loading());
  const orderList = h('ol', { id: 'job-hospital-order', class: 'order-list', 'aria-labelledby': 'visit-order-heading' });
  const orderBox = h('div', { class: 'order' }, h('h2', { id: 'visit-order-heading', class: 'order-title' }, 'Visit order'), orderList);
  const fieldset = h('fieldset', { id: 'job-hospitals', class: 'group' },
    h('legend', {}, 'Hospitals'),
    h('p', { class: 'hint' }, 'Choose the hospitals to train with. Every round visits them in the order shown.'),
    h('div', { class: 'picker' }, choices, orderBox));

  const checkboxId = (x) => `job-hospital-${x.id}`;

  function move(index, delta) {
    const to = index + delta;
    if (to < 0 || to >= order.length) return;
    [order[index], order[to]] = [order[to], order[index]];
    renderOrder();
    announce(`${order[to]} moved to position ${to + 1} of ${order.length}`);
  }

  function moveButton(nameAt, i, delta) {
    const edge = delta < 0 ? i === 0 : i === order.length - 1;
    const label = delta < 0 ? 'Move up' : 'Move down';
    return h('button', {
      type: 'button', class: 'small button-quiet', 'aria-disabled': edge ? 'true' : null,
      'data-focus-key': `${delta < 0 ? 'up' : 'down'}-${nameAt}`,
      onclick: () => { if (!edge) move(i, delta); },
    }, h('span', { 'aria-hidden': 'true' }, delta < 0 ? '↑ ' : '↓ '), label, srOnly(` ${nameAt}`));
  }

  function renderOrder() {
    patch(orderList, order.length === 0
      ? h('li', { class: 'empty' }, 'No hospital chosen yet.')
      : order.map((n, i) => h('li', {}, h('span', { class: 'name' }, n),
        h('span', { class: 'buttons' }, moveButton(n, i, -1), moveButton(n, i, 1)))));
  }

  function toggle(x, checked) {
    order = checked ? [...order.filter((n) => n !== x.name), x.name] : order.filter((n) => n !== x.name);
    renderOrder();
  }

  renderOrder();
  return {
    el: fieldset,
    fieldset,
    order: () => [...order],
    setHospitals(list) {
      hospitals = list;
      order = order.filter((n) => list.some((x) => x.name === n));
      patch(choices, list.length === 0
        ? h('p', { class: 'empty' }, 'No active hospitals exist yet; a platform admin must create them first.')
        : list.map((x) => {
          const box = h('input', { type: 'checkbox', id: checkboxId(x), name: 'hospitals', value: x.name, checked: order.includes(x.name) });
          box.addEventListener('change', () => toggle(x, box.checked));
          return h('div', { class: 'field-check' }, box, h('label', { for: box.id }, x.name));
        }));
      renderOrder();
    },
    /** The checkbox to focus for an error about the i-th hospital of the order (or the first). */
    focusTarget(i) {
      const n = i == null ? null : order[i];
      const x = hospitals.find((y) => y.name === n) ?? hospitals[0];
      return (x && document.getElementById(checkboxId(x))) ?? fieldset;
    },
  };
}

// ---------------------------------------------------------------------------------------------
// Job detail

function jobPage(page, id) {
  const main = document.getElementById('main');
  const title = pageHeading('Job');
  const statusBox = h('span', { class: 'status-box' });
  const actions = h('div', { class: 'head-actions' });
  const live = liveLine('job-live');
  const activity = h('div', { class: 'activity' }, loading());
  const summary = h('div');
  const timeline = h('div');
  const results = h('div');
  const plots = h('div', { class: 'plots' });
  const traffic = h('div');
  const exportsBox = h('div');
  const privacyBox = h('div');
  const eventsBox = h('div');
  const section = (headingId, heading, ...body) => h('section', { class: 'panel', 'aria-labelledby': headingId },
    h('h2', { id: headingId }, heading), ...body);
  const events = [];
  let job = null;
  let metrics = null;
  let exports = [];
  let privacy = null;
  let jobPoll = null;
  let exportPoll = null;
  // The round whose test results are shown; null: the latest measured.
  let resultsRound = null;
  const chooseRound = (round) => {
    resultsRound = round;
    renderJob();
  };

  // The charts are drawn at a different size on phones: redraw them when the width crosses over.
  const redraw = () => {
    [plots, results, traffic].forEach((el) => rendered.delete(el));
    if (job) renderJob();
  };
  for (const query of [NARROW, TRAFFIC_CARDS].map((q) => window.matchMedia(q))) {
    query.addEventListener('change', redraw);
    page.cleanups.push(() => query.removeEventListener('change', redraw));
  }

  async function cancel() {
    if (!window.confirm(`Cancel job ${job.name}? Visits in progress stop, and a cancelled job cannot be resumed.`)) return;
    const cancelled = await POST(`/v1/jobs/${id}/cancel`);
    if (!page.active) return;
    job = cancelled;
    announce(`Job ${job.name} cancelled`);
    jobPoll?.refresh();
  }

  function renderJob() {
    title.textContent = job.name;
    document.title = `${job.name} · MedSplit`;
    patchIfChanged(statusBox, [job.status, job.spec.insecure_plaintext],
      () => [h('span', { class: 'job-status', id: 'job-status' }, badge(job.status)),
        job.spec.insecure_plaintext ? encryptionBadge(job.spec) : null]);
    const canCancel = LIVE_JOB.has(job.status)
      && (job.owner_id === session.me.id || session.me.role === 'platform_admin');
    patchIfChanged(actions, canCancel, () => (canCancel ? h('button', {
      type: 'button', class: 'button-danger', id: 'cancel-job', 'data-focus-key': 'cancel', onclick: guard(cancel),
    }, 'Cancel job') : null));
    const visit = metrics.visits.find((v) => v.id === job.current?.visit_id) ?? null;
    patchIfChanged(activity, [job, visit], () => activityView(job, visit));
    patchIfChanged(summary, [job.spec, job.network, job.source], () => specSummary(job.spec, job.network, job.source));
    patchIfChanged(timeline, [job.hospitals, metrics.visits], () => timelineView(job, metrics.visits));
    const evaluated = metrics.visits.filter((v) => v.test_evaluation)
      .map((v) => ({ round: v.round, position: v.position, hospital: v.hospital, evaluation: v.test_evaluation }));
    patchIfChanged(results, [metrics.rounds, evaluated, resultsRound],
      () => resultsView(metrics.rounds, evaluated, resultsRound, chooseRound));
    patchIfChanged(plots, [job.spec.rounds, metrics.rounds], () => plotsView(job, metrics.rounds));
    patchIfChanged(traffic, metrics.visits, () => trafficView(metrics.visits));
    patchIfChanged(exportsBox, [job.status, job.spec.release, exports], () => exportsView(job, exports));
    patchIfChanged(privacyBox, [job.privacy, privacy], () => privacyView(job, privacy));
    patchIfChanged(eventsBox, [events.length && events[events.length - 1].id, metrics.visits],
      () => eventsView(events, job, metrics.visits));
  }

  async function load() {
    const after = events.length ? events[events.length - 1].id : 0;
    const [j, m, fresh, x, p] = await Promise.all([
      GET(`/v1/jobs/${id}`), GET(`/v1/jobs/${id}/metrics`), GET(`/v1/jobs/${id}/events?after=${after}`),
      GET(`/v1/jobs/${id}/exports`), GET(`/v1/jobs/${id}/privacy`),
    ]);
    if (!page.active) return;
    const wasLive = job && LIVE_JOB.has(job.status);
    job = j;
    metrics = m;
    exports = x;
    privacy = p;
    events.push(...fresh);
    renderJob();
    if (LIVE_JOB.has(job.status)) {
      live.ok();
      return;
    }
    jobPoll?.stop();
    live.ok(`Job ${job.status}; updates stopped at`);
    // A finished model may still be exported: keep its list of exports current.
    if (job.status === 'completed' && !exportPoll) {
      exportPoll = poller(page, async () => {
        const fresh = await GET(`/v1/jobs/${id}/exports`);
        if (!page.active) return;
        exports = fresh;
        renderJob();
      }, 10000, live.error);
    }
    if (wasLive) announce(`Job ${job.name} ${STATUS_LABELS[job.status]?.toLowerCase() ?? job.status}`);
  }

  main.append(
    h('div', { class: 'page-head' }, h('div', { class: 'title-row' }, title, statusBox), actions),
    live.el, activity,
    section('timeline-heading', 'Rounds and visits', timeline),
    section('results-heading', 'Test results', results),
    section('plots-heading', 'Training curves', plots),
    section('traffic-heading', 'Encrypted traffic and time per visit', traffic),
    section('exports-heading', 'The trained model', exportsBox),
    section('privacy-heading', 'Privacy', privacyBox),
    section('spec-heading', 'Job specification', summary),
    section('events-heading', 'Recent events', eventsBox),
  );

  jobPoll = poller(page, async () => {
    try {
      await load();
    } catch (e) {
      if (e instanceof ApiError && e.status === 404 && !job) {
        jobPoll.stop();
        patch(main, pageHeading('Job not found'), h('p', {}, 'There is no job with this number that you may see.'),
          h('p', {}, h('a', { href: '/' }, 'Go to the home page')));
        main.querySelector('h1').focus();
        return;
      }
      throw e;
    }
  }, 2000, live.error);
}

function activityView(job, visit) {
  const nodes = [h('p', { class: 'activity-text' }, job.status === 'failed' ? 'The job failed.' : jobActivity(job))];
  const c = job.current;
  if (job.status === 'running' && c) {
    if (c.status === 'running') {
      nodes.push(h('progress', { max: '1', value: c.progress ?? 0, 'aria-label': `Progress of the visit at ${c.hospital}` }));
    }
    if (visit?.failures > 0) {
      nodes.push(h('p', { class: 'warning' }, `Attempt ${visit.attempt + (c.status === 'queued' ? 1 : 0)} of ${job.spec.max_attempts}`,
        visit.last_error ? `; last error: ${visit.last_error}` : ''));
    }
  }
  if (job.status === 'pending') nodes.push(consentList(job));
  if (job.status === 'failed' && job.error) nodes.push(h('p', { class: 'error-text', id: 'job-error' }, job.error));
  nodes.push(h('p', { class: 'meta' },
    `Visits done: ${job.visits_done} of ${job.visits_total}. Created `, timeEl(job.created_at),
    job.started_at ? ['; started ', timeEl(job.started_at)] : null,
    job.finished_at ? ['; ended ', timeEl(job.finished_at)] : null, '.'));
  return nodes;
}

/** Who may take the finished model, and which agent exported it when. */
function exportsView(job, exports) {
  const policy = h('p', {}, h('strong', {}, 'Release policy: '), RELEASE_LABELS[job.spec.release ?? 'participants']);
  if (job.status !== 'completed') {
    return [policy, h('p', { class: 'empty' }, 'The model can be exported or used once the job has completed.')];
  }
  const how = (job.spec.release ?? 'participants') === 'nobody'
    ? h('p', { class: 'meta' }, 'Each hospital classifies new beats with ', h('code', {}, `medsplit-agent predict --job ${job.id}`),
      ': its client layers run at the hospital, this layer on ciphertexts here.')
    : h('p', { class: 'meta' }, 'An agent of a participating hospital exports it with ',
      h('code', {}, `medsplit-agent export --job ${job.id} --out DIR`), '.');
  const list = exports.length === 0
    ? h('p', { class: 'empty', id: 'exports-empty' }, 'No agent has exported this model.')
    : dataTable({
      id: 'exports-table', caption: 'Exports of this job’s model',
      columns: ['Hospital', 'Agent', 'When'],
      rows: exports.map((x) => [x.hospital, `${x.agent} (agent ${x.agent_id})`, timeEl(x.at)]),
    });
  return [policy, how, list];
}

function visitCell(v) {
  if (!v) return '—';
  return h('div', { class: 'visit-cell' },
    badge(v.status),
    v.status === 'running'
      ? h('progress', { max: '1', value: v.progress ?? 0, 'aria-label': `${v.hospital}, round ${v.round + 1}: progress` })
      : null,
    v.status === 'running' ? h('span', { class: 'meta' }, ` ${wholePct(v.progress)}`) : null,
    v.test_accuracy != null ? h('span', { class: 'acc' }, `Test ${fmtPct(v.test_accuracy)}`) : null,
    v.test_evaluation ? h('span', { class: 'meta' }, `Majority class ${fmtPct(v.test_evaluation.majority_rate)}`) : null,
    v.failures > 0 ? h('span', { class: 'meta' }, `${v.failures} failed attempt${v.failures > 1 ? 's' : ''}`) : null);
}

function timelineView(job, visits) {
  if (visits.length === 0) {
    return h('p', { class: 'empty' }, job.status === 'pending'
      ? 'No visits yet: they are scheduled when every hospital has approved the job.'
      : 'This job has no visits.');
  }
  const hospitals = [...job.hospitals].sort((a, b) => a.position - b.position);
  const rounds = [...new Set(visits.map((v) => v.round))].sort((a, b) => a - b);
  return dataTable({
    id: 'timeline-table', caption: 'One row per round, one column per hospital, in visit order', rowHeaders: true,
    columns: ['Round', ...hospitals.map((x) => x.name)],
    rows: rounds.map((r) => [`Round ${r + 1}`,
      ...hospitals.map((x) => visitCell(visits.find((v) => v.round === r && v.position === x.position)))]),
  });
}

/** Below this width the per-visit traffic is a list of cards instead of a table. */
const TRAFFIC_CARDS = '(max-width: 60rem)';
const TRAFFIC_CAPTION = 'Per visit: ciphertext bytes to and from the coordinator, messages and time';

function trafficView(visits) {
  const shown = visits.filter((v) => v.started_at || v.status === 'skipped');
  if (shown.length === 0) return h('p', { class: 'empty' }, 'No visit has started yet.');
  const sum = (key) => shown.reduce((acc, v) => acc + (v[key] ?? 0), 0);
  const total = {
    bytes_up: sum('bytes_up'), bytes_down: sum('bytes_down'), messages: sum('messages'),
    server_seconds: sum('server_seconds'), wall_seconds: sum('wall_seconds'),
  };
  const view = window.matchMedia(TRAFFIC_CARDS).matches ? trafficCards : trafficTable;
  return [view(shown, total), trafficBars(shown)];
}

const POOLED = 'All hospitals (pooled)';

/** Which kind of split the figures come from, said in words. */
function evaluationKind(evaluation, kinds) {
  const mixed = kinds.size > 1 ? ' Hospitals differ in how they split: see the Split column.' : '';
  if (evaluation.kind === 'patient') {
    return h('p', { class: 'notice', id: 'eval-kind', 'data-kind': 'patient' },
      h('strong', {}, 'Split by patient. '), 'Every hospital tested on patients it did not train on: the figures say how the model does on new patients.');
  }
  return h('p', { class: 'warning', id: 'eval-kind', 'data-kind': 'beat' },
    h('strong', {}, 'Split by beat. '),
    'Test beats come from the same patients as training beats, so these figures overstate how the model does on new patients.',
    mixed);
}

/** Beats by true class (rows) and predicted class (columns), with each class's figures. */
function confusionTable(id, title, e) {
  const predicted = e.classes.map((_, c) => e.confusion.reduce((sum, row) => sum + row[c], 0));
  return tableWrap(h('table', { id, class: 'confusion', 'data-hospital': title },
    h('caption', {}, title, h('span', { class: 'meta' }, ' · rows: true class, columns: predicted')),
    h('thead', {}, h('tr', {},
      h('th', { scope: 'col' }, srOnly('True class'), h('span', { 'aria-hidden': 'true' }, 'True ╲ predicted')),
      e.classes.map((c) => h('th', { scope: 'col', class: 'num' }, c)),
      h('th', { scope: 'col', class: 'num' }, 'Beats'),
      h('th', { scope: 'col', class: 'num' }, 'Sensitivity'),
      h('th', { scope: 'col', class: 'num' }, 'F1'))),
    h('tbody', {}, e.classes.map((c, i) => {
      const k = e.per_class[c];
      return h('tr', {},
        h('th', { scope: 'row' }, c),
        e.confusion[i].map((n, j) => h('td', { class: i === j ? 'num hit' : 'num' }, fmtCount(n))),
        h('td', { class: 'num' }, fmtCount(k.support)),
        h('td', { class: 'num' }, k.support > 0 ? fmtPct(k.se) : '—'),
        h('td', { class: 'num' }, k.f1.toFixed(3)));
    })),
    h('tfoot', {},
      h('tr', {}, h('th', { scope: 'row' }, 'Predicted'), predicted.map((n) => h('td', { class: 'num' }, fmtCount(n))),
        h('td', { class: 'num' }, fmtCount(predicted.reduce((a, b) => a + b, 0))), h('td', {}), h('td', {})),
      h('tr', {}, h('th', { scope: 'row' }, 'PPV'),
        e.classes.map((c, j) => h('td', { class: 'num' }, predicted[j] > 0 ? fmtPct(e.per_class[c].ppv) : '—')),
        h('td', {}), h('td', {}), h('td', {})))), `Confusion matrix: ${title}`);
}

/** One round's test results: per hospital and pooled, the figures and the confusion matrices. */
function resultsView(rounds, evaluated, chosen, choose) {
  const measured = rounds.filter((r) => r.pooled_test_evaluation);
  if (measured.length === 0) {
    return h('p', { class: 'empty' }, 'No test results yet: each hospital measures its held-out beats at the end of its visit.');
  }
  const round = measured.find((r) => r.round === chosen) ?? measured[measured.length - 1];
  const pooled = round.pooled_test_evaluation;
  const ofRound = evaluated.filter((v) => v.round === round.round).sort((a, b) => a.position - b.position);
  const picker = h('select', {
    id: 'results-round', 'data-focus-key': 'results-round',
    onchange: (event) => choose(Number(event.target.value)),
  }, measured.map((r) => h('option', { value: r.round, selected: r.round === round.round }, `Round ${r.round + 1}`)));
  const beats = (e) => e.confusion.flat().reduce((a, b) => a + b, 0);
  const rows = [...ofRound.map((v) => [v.hospital, v.evaluation]), [POOLED, pooled]];
  return [
    evaluationKind(pooled, new Set(ofRound.map((v) => v.evaluation.kind))),
    h('div', { class: 'field inline-field' }, h('label', { for: 'results-round' }, 'Results of'), picker),
    dataTable({
      id: 'results-table', rowHeaders: true,
      caption: `Round ${round.round + 1}: each hospital's held-out beats, and all of them pooled`,
      columns: ['Hospital', 'Split', 'Beats', 'Accuracy', 'Majority class', 'Macro-F1', 'Balanced accuracy'],
      rows: rows.map(([name, e]) => [name, `by ${e.kind}`, fmtCount(beats(e)), fmtPct(e.accuracy), fmtPct(e.majority_rate),
        e.macro_f1.toFixed(3), fmtPct(e.balanced_accuracy)]),
    }),
    h('p', { class: 'hint' }, 'Majority class: the accuracy of answering the most frequent class to every beat of the same test set. '
      + 'Sensitivity: the share of a class\'s beats found; PPV: the share of beats called that class that are of it.'),
    h('div', { class: 'matrices' }, rows.map(([name, e], i) =>
      confusionTable(i === rows.length - 1 ? 'confusion-pooled' : `confusion-${i}`, name, e))),
  ];
}

/** The figures of a visit (or of the total), label and formatted value. */
function trafficFigures(v, all = true) {
  return [
    ['Up', fmtMB(v.bytes_up)], ['Down', fmtMB(v.bytes_down)], ['Messages', fmtCount(v.messages)],
    ['Coordinator compute', fmtSecs(v.server_seconds)], ['Wall time', fmtSecs(v.wall_seconds)],
    ...(all ? [['Train loss', fmtLoss(v.train_loss)], ['Train accuracy', fmtPct(v.train_accuracy)],
      ['Test accuracy', fmtPct(v.test_accuracy)]] : []),
  ];
}

function trafficTable(shown, total) {
  const groups = [['Visit', 4], ['Encrypted traffic', 3], ['Time', 2], ['Training', 2], ['Test', 1]];
  const columns = ['Round', 'Hospital', 'Attempt', 'Status', 'Up', 'Down', 'Messages', 'Coordinator', 'Wall',
    'Loss', 'Accuracy', 'Accuracy'];
  const num = (text) => h('td', { class: 'num' }, text);
  const table = h('table', { id: 'visits-table' },
    h('caption', {}, TRAFFIC_CAPTION),
    groups.map(([, span]) => h('colgroup', { span })),
    h('thead', {},
      h('tr', { class: 'groups' }, groups.map(([label, span]) => h('th', { scope: 'colgroup', colspan: span }, label))),
      h('tr', {}, columns.map((c, i) => h('th', { scope: 'col', class: i === 2 || i >= 4 ? 'num' : null }, c)))),
    h('tbody', {}, shown.map((v) => h('tr', {},
      h('td', {}, `${v.round + 1}`), h('td', { class: 'name' }, v.hospital), num(v.attempt), h('td', {}, badge(v.status)),
      trafficFigures(v).map(([, text]) => num(text))))),
    h('tfoot', {}, h('tr', {}, h('th', { scope: 'row', colspan: '4' }, 'Total'),
      trafficFigures(total, false).map(([, text]) => num(text)), h('td', { colspan: '3' }))));
  return tableWrap(table, TRAFFIC_CAPTION);
}

function trafficCards(shown, total) {
  const figures = (pairs) => h('dl', { class: 'figures' },
    pairs.map(([k, v]) => h('div', {}, h('dt', {}, k), h('dd', {}, v))));
  return h('div', { id: 'visits-list' },
    h('h3', { class: 'list-title' }, TRAFFIC_CAPTION),
    h('ol', { class: 'visit-cards' }, shown.map((v) => h('li', { class: 'visit-card' },
      h('p', { class: 'visit-card-title' }, h('strong', {}, `Round ${v.round + 1}`), ` · ${v.hospital} · attempt ${v.attempt} `,
        badge(v.status)),
      figures(trafficFigures(v))))),
    h('div', { class: 'visit-card visit-card-total' }, h('p', { class: 'visit-card-title' }, h('strong', {}, 'Total')),
      figures(trafficFigures(total, false))));
}

function eventsView(events, job, visits) {
  if (events.length === 0) return h('p', { class: 'empty' }, 'No events yet.');
  return h('ol', { class: 'events', id: 'job-events' }, events.slice(-30).reverse().map((e) =>
    h('li', {}, timeEl(e.at), ' ', h('code', {}, e.kind), ' ', h('span', { class: 'meta' }, eventText(e, job, visits)))));
}

/** What a job event says, in words: rounds counted from 1, figures formatted. */
function eventText({ kind, detail: d = {} }, job, visits) {
  const hospital = (id) => job.hospitals.find((x) => x.hospital_id === id)?.name ?? `hospital ${id}`;
  const at = (position) => job.hospitals.find((x) => x.position === position)?.name ?? `position ${position + 1}`;
  const visit = (id) => {
    const v = visits.find((x) => x.id === id);
    return v ? `round ${v.round + 1} at ${v.hospital}` : `visit ${id}`;
  };
  switch (kind) {
    case 'job.created':
      return `waiting for the consent of ${(d.awaiting_consent ?? []).join(', ') || 'no hospital'}`;
    case 'consent.approved':
    case 'consent.declined':
    case 'job.declined':
      return `${hospital(d.hospital_id)} ${kind === 'consent.approved' ? 'approved' : 'declined'}`;
    case 'visit.started':
      return `round ${d.round + 1} at ${at(d.position)}: attempt ${d.attempt}, agent ${d.agent_id}`;
    case 'visit.completed':
      return [`${visit(d.visit_id)}: training loss ${fmtLoss(d.train_loss)}, accuracy ${fmtPct(d.train_accuracy)}`,
        d.test_accuracy == null ? null : `, test accuracy ${fmtPct(d.test_accuracy)}`,
        `; ${fmtMB(d.bytes_up)} up, ${fmtMB(d.bytes_down)} down`].filter(Boolean).join('');
    case 'visit.failed':
      return [visit(d.visit_id), d.refused ? ': refused by the hospital' : `: ${d.failures} failed attempt${d.failures === 1 ? '' : 's'}`,
        d.retry ? '; it will be retried' : '', d.error ? ` (${d.error})` : ''].join('');
    case 'visit.skipped':
      return `${visit(d.visit_id)} skipped`;
    case 'job.failed':
      return d.reason ?? '—';
    case 'job.cancelled':
      return d.by ? `by ${d.by}` : '—';
    default:
      return fmtDetail(d);
  }
}

// ---------------------------------------------------------------------------------------------
// SVG plots, drawn here

/** Drawing size in SVG units: narrower on phones, so that the text stays readable when scaled. */
const NARROW = '(max-width: 640px)';
const narrowScreen = () => window.matchMedia(NARROW).matches;
const plotBox = () => ({ w: narrowScreen() ? 380 : 560, h: 280, left: 60, right: 14, top: 14, bottom: 44 });
const SERIES_CLASSES = 8; // .series-0 … .series-7 in app.css: colour, dash and marker fill differ

/** Rounded tick values covering [lo, hi]. */
function niceTicks(lo, hi, count = 4) {
  const raw = (hi - lo) / count || 1;
  const mag = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((st) => st >= raw) ?? raw;
  const ticks = [];
  for (let t = Math.floor(lo / step) * step; ticks.length < count + 3; t += step) {
    ticks.push(Number(t.toPrecision(12)));
    if (t >= hi - step / 1e6) break;
  }
  return ticks;
}

/**
 * A line plot: `series` is [{name, cls, points: [{round, value}]}]; x is the 1-based round.
 * Every point is a <circle class="point" data-series data-round>.
 */
function linePlot({ id, title, yLabel, rounds, series, yRange, format, tickFormat = format }) {
  const { w, h: ht, left, right, top, bottom } = plotBox();
  const values = series.flatMap((sr) => sr.points.map((p) => p.value));
  const yTicks = niceTicks(...(yRange?.(values) ?? [0, Math.max(...values, 0) * 1.05 || 1]));
  const [yBottom, yTop] = [yTicks[0], yTicks[yTicks.length - 1]];
  const xMax = Math.max(rounds, ...series.flatMap((sr) => sr.points.map((p) => p.round)), 1);
  const x = (r) => left + ((r - 0.5) / xMax) * (w - left - right);
  const y = (v) => top + (1 - (v - yBottom) / (yTop - yBottom)) * (ht - top - bottom);
  const xStep = Math.ceil(xMax / (w / 50));
  const xTicks = Array.from({ length: xMax }, (_, i) => i + 1).filter((r) => (r - 1) % xStep === 0 || r === xMax);

  const axes = s('g', { class: 'axes', 'aria-hidden': 'true' },
    yTicks.map((t) => s('g', {},
      s('line', { class: 'grid', x1: left, x2: w - right, y1: y(t), y2: y(t) }),
      s('text', { x: left - 8, y: y(t), 'text-anchor': 'end', 'dominant-baseline': 'middle' }, tickFormat(t)))),
    xTicks.map((r) => s('text', { x: x(r), y: ht - bottom + 18, 'text-anchor': 'middle' }, String(r))),
    s('line', { class: 'axis', x1: left, x2: w - right, y1: ht - bottom, y2: ht - bottom }),
    s('line', { class: 'axis', x1: left, x2: left, y1: top, y2: ht - bottom }),
    s('text', { class: 'axis-title', x: (left + w - right) / 2, y: ht - 6, 'text-anchor': 'middle' }, 'Round'),
    s('text', { class: 'axis-title', transform: `translate(14 ${(top + ht - bottom) / 2}) rotate(-90)`, 'text-anchor': 'middle' }, yLabel));

  const lines = series.map((sr) => s('g', { class: `series ${sr.cls}` },
    sr.points.length > 1
      ? s('polyline', { class: 'line', points: sr.points.map((p) => `${x(p.round)},${y(p.value)}`).join(' ') })
      : null,
    sr.points.map((p) => s('circle', {
      class: 'point', 'data-series': sr.name, 'data-round': p.round, cx: x(p.round), cy: y(p.value), r: 4,
    }, s('title', {}, `${sr.name}, round ${p.round}: ${format(p.value)}`)))));

  const empty = values.length === 0
    ? s('text', { class: 'empty-plot', x: (left + w - right) / 2, y: (top + ht - bottom) / 2, 'text-anchor': 'middle' }, 'No completed visits yet')
    : null;

  const svg = s('svg', {
    id, class: 'plot', viewBox: `0 0 ${w} ${ht}`, width: '100%', role: 'img', 'aria-label': plotSummary(title, series, format),
  }, axes, lines, empty);

  return h('figure', { class: 'plot-figure' },
    h('figcaption', {}, title), svg, legend(series), plotTable(title, series, format));
}

function plotSummary(title, series, format) {
  const withData = series.filter((sr) => sr.points.length);
  if (withData.length === 0) return `${title}: no completed visits yet.`;
  const last = withData.map((sr) => {
    const p = sr.points[sr.points.length - 1];
    return `${sr.name} ${format(p.value)} in round ${p.round}`;
  });
  return `${title}, ${withData.length} series. Latest values: ${last.join('; ')}. The table below lists every value.`;
}

function legend(series) {
  return h('ul', { class: 'legend', 'aria-hidden': 'true' }, series.map((sr) => h('li', {},
    s('svg', { class: `swatch series ${sr.cls}`, viewBox: '0 0 36 12', width: '36', height: '12' },
      s('line', { class: 'line', x1: 2, x2: 34, y1: 6, y2: 6 }), s('circle', { class: 'marker', cx: 18, cy: 6, r: 4 })),
    sr.name)));
}

/** The plot's numbers as a table for screen readers. */
function plotTable(title, series, format) {
  const rounds = [...new Set(series.flatMap((sr) => sr.points.map((p) => p.round)))].sort((a, b) => a - b);
  return h('div', { class: 'visually-hidden' }, h('table', {},
    h('caption', {}, title),
    h('thead', {}, h('tr', {}, h('th', { scope: 'col' }, 'Round'), series.map((sr) => h('th', { scope: 'col' }, sr.name)))),
    h('tbody', {}, rounds.map((r) => h('tr', {}, h('th', { scope: 'row' }, String(r)),
      series.map((sr) => h('td', {}, format(sr.points.find((p) => p.round === r)?.value))))))));
}

/** Accuracy axis: up to 100%, from 0 or (when every value is high) a little below the lowest. */
function accuracyRange(values) {
  const low = Math.min(...values);
  return [values.length === 0 || low < 0.3 ? 0 : Math.floor((low - 0.05) * 10) / 10, 1];
}

function plotsView(job, rounds) {
  const names = [...job.hospitals].sort((a, b) => a.position - b.position).map((x) => x.name);
  const seriesOf = (key) => names.map((name, i) => ({
    name, cls: `series-${i % SERIES_CLASSES}`,
    points: rounds.flatMap((r) => {
      const value = r.hospitals.find((x) => x.hospital === name)?.[key];
      return value == null ? [] : [{ round: r.round + 1, value }];
    }),
  }));
  const mean = {
    name: 'mean', cls: 'series-mean',
    points: rounds.filter((r) => r.mean_test_accuracy != null).map((r) => ({ round: r.round + 1, value: r.mean_test_accuracy })),
  };
  const measured = rounds.filter((r) => r.pooled_test_evaluation);
  const majority = {
    name: 'always the majority class', cls: 'series-majority',
    points: measured.map((r) => ({ round: r.round + 1, value: r.pooled_test_evaluation.majority_rate })),
  };
  const classes = measured.length ? measured[measured.length - 1].pooled_test_evaluation.classes : [];
  const sensitivity = classes.map((name, i) => ({
    name, cls: `series-${i % SERIES_CLASSES}`,
    points: measured.flatMap((r) => {
      const c = r.pooled_test_evaluation.per_class[name];
      return c && c.support > 0 ? [{ round: r.round + 1, value: c.se }] : [];
    }),
  }));
  return [
    linePlot({ id: 'plot-loss', title: 'Training loss per round', yLabel: 'Training loss', rounds: job.spec.rounds,
      series: seriesOf('train_loss'), format: fmtLoss, tickFormat: (t) => String(Number(t.toFixed(3))) }),
    linePlot({ id: 'plot-accuracy', title: 'Test accuracy per round', yLabel: 'Test accuracy', rounds: job.spec.rounds,
      series: [...seriesOf('test_accuracy'), mean, majority], yRange: accuracyRange, format: fmtPct,
      tickFormat: (t) => `${Number((t * 100).toFixed(1))}%` }),
    linePlot({ id: 'plot-sensitivity', title: 'Sensitivity per class per round, all hospitals pooled', yLabel: 'Sensitivity',
      rounds: job.spec.rounds, series: sensitivity, yRange: () => [0, 1], format: fmtPct,
      tickFormat: (t) => `${Number((t * 100).toFixed(1))}%` }),
  ];
}

/** A small bar chart of megabytes (up + down) per visit. */
function trafficBars(visits) {
  const short = (name) => (name.length > 14 ? `${name.slice(0, 13)}…` : name);
  const data = visits.filter((v) => v.bytes_up != null || v.bytes_down != null).slice(-40)
    .map((v) => ({ label: `R${v.round + 1} ${short(v.hospital)}`, mb: ((v.bytes_up ?? 0) + (v.bytes_down ?? 0)) / 1e6 }));
  if (data.length === 0) return null;
  const rowH = 22;
  const [w, labelW] = narrowScreen() ? [380, 120] : [640, 160];
  const max = Math.max(...data.map((d) => d.mb), 0.1);
  return h('figure', { class: 'plot-figure bars' },
    h('figcaption', {}, `Megabytes exchanged per visit (up + down)${data.length === 40 ? ', latest 40 visits' : ''}`),
    s('svg', {
      id: 'plot-traffic', class: 'plot', viewBox: `0 0 ${w} ${data.length * rowH + 8}`, width: '100%', role: 'img',
      'aria-label': `Megabytes per visit: ${data.map((d) => `${d.label} ${d.mb.toFixed(1)} MB`).join('; ')}`,
    }, data.map((d, i) => s('g', {},
      s('text', { x: labelW - 8, y: i * rowH + 15, 'text-anchor': 'end' }, d.label),
      s('rect', { class: 'bar', x: labelW, y: i * rowH + 4, height: rowH - 8, width: Math.max(1, (d.mb / max) * (w - labelW - 90)) }),
      s('text', { x: labelW + (d.mb / max) * (w - labelW - 90) + 6, y: i * rowH + 15 }, `${d.mb.toFixed(1)} MB`)))));
}

// ---------------------------------------------------------------------------------------------
// Start-up

async function start() {
  document.addEventListener('click', onLinkClick);
  window.addEventListener('popstate', onPopState);
  let resized = 0;
  window.addEventListener('resize', () => {
    cancelAnimationFrame(resized);
    resized = requestAnimationFrame(() => markScrolling());
  });
  try {
    setSession(await api('GET', '/v1/me', undefined, { quiet401: true }));
  } catch (e) {
    if (!(e instanceof ApiError && e.status === 401)) return startupError(e);
    setSession(null);
  }
  render();
}

function startupError(e) {
  document.title = 'Unavailable · MedSplit';
  const retry = h('button', { type: 'button', onclick: () => { firstRender = true; start(); } }, 'Try again');
  document.getElementById('main').replaceChildren(h('h1', { tabindex: '-1' }, 'MedSplit is unavailable'),
    h('p', { class: 'error-text', role: 'alert' }, errorText(e)), h('p', {}, retry));
}

start();
