// The dashboard walk-through in a real browser (Debian's Chromium driven by playwright-core),
// against a real coordinator process and Postgres, with a real `medsplit-agent` process.
//
// Run by coordinator/tests/browser.rs, which starts the coordinator on a fresh database, creates
// the platform admin and passes everything through the environment:
//   MEDSPLIT_URL, ADMIN_EMAIL, ADMIN_PASSWORD, AGENT_BIN, WORK_DIR, SCREENSHOT_DIR, CHROMIUM
//
// Any page error, console error, 5xx response, accessibility violation (axe-core, WCAG 2.1 A
// and AA) or element wider than its card, on every page that is photographed, fails the run.

import { spawn } from 'node:child_process';
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { chromium } from 'playwright-core';

const env = (name, fallback) => {
  const value = process.env[name] ?? fallback;
  if (value === undefined) throw new Error(`${name} is not set`);
  return value;
};
const BASE = env('MEDSPLIT_URL');
const ADMIN = { email: env('ADMIN_EMAIL'), password: env('ADMIN_PASSWORD') };
const AGENT_BIN = env('AGENT_BIN');
const WORK = env('WORK_DIR');
const SHOTS = env('SCREENSHOT_DIR');
const CHROMIUM = env('CHROMIUM', '/usr/bin/chromium');
const PASSWORD = 'a long enough password 42';
const HOSPITAL = 'st-olav';
const HOSPITAL_ADMIN = 'ward@st-olav.example';
const RESEARCHER = 'ada@research.example';
const ROUNDS = 3;
const MAX_SEED = '9007199254740991'; // 2^53 - 1, the largest seed

const problems = [];
const children = [];

function step(message) {
  console.log(`[walkthrough] ${message}`);
}

function check(condition, message) {
  if (!condition) throw new Error(`check failed: ${message}`);
}

/** A page whose errors fail the run. */
async function openPage(browser, who, viewport = { width: 1280, height: 800 }) {
  const context = await browser.newContext({ viewport, baseURL: BASE });
  const page = await context.newPage();
  page.on('pageerror', (e) => problems.push(`${who}: page error: ${e.message}`));
  page.on('console', (m) => {
    if (m.type() === 'error') problems.push(`${who}: console error: ${m.text()}`);
  });
  page.on('response', (r) => {
    if (r.status() >= 500) problems.push(`${who}: ${r.status()} from ${r.url()}`);
  });
  page.on('dialog', (d) => d.accept());
  page.setDefaultTimeout(20_000);
  return page;
}

const AXE = readFileSync(new URL('./node_modules/axe-core/axe.min.js', import.meta.url), 'utf8');

/** Records the page's WCAG 2.1 A/AA violations as problems. */
async function accessibility(page, name) {
  // Evaluated through the DevTools protocol, which the page's CSP does not govern.
  await page.evaluate(`${AXE}\n;undefined`);
  const violations = await page.evaluate(async () => {
    const result = await window.axe.run(document, {
      runOnly: { type: 'tag', values: ['wcag2a', 'wcag2aa', 'wcag21a', 'wcag21aa'] },
    });
    return result.violations.map((v) => `${v.id} (${v.nodes.length}): ${v.help}`);
  });
  for (const v of violations) problems.push(`${name}: accessibility: ${v}`);
}

/**
 * Records as problems the elements that do not fit in their card (a panel, card or table box)
 * at the page's width. A table may be wider than its box only if the box says so (shadows at
 * its edges and "scroll sideways" in its caption); the per-visit traffic must fit.
 */
async function fits(page, name) {
  const found = await page.evaluate(() => {
    const out = [];
    const describe = (el) => {
      const id = el.id ? `#${el.id}` : `${el.tagName.toLowerCase()}${[...el.classList].map((c) => `.${c}`).join('')}`;
      return `${id} "${(el.textContent ?? '').trim().replace(/\s+/g, ' ').slice(0, 40)}"`;
    };
    const wider = (el) => el.scrollWidth > el.clientWidth + 1;
    for (const box of document.querySelectorAll('.panel, .card, .visit-card, .table-wrap, fieldset.group')) {
      const b = box.getBoundingClientRect();
      if (b.width === 0) continue;
      if (box.classList.contains('table-wrap') && wider(box)) {
        const cue = getComputedStyle(box.querySelector('caption') ?? box, '::after').content;
        if (!box.classList.contains('scrolls') || !cue.includes('scroll sideways')) {
          out.push(`${describe(box)}: ${box.scrollWidth} px of table in ${box.clientWidth} px, with no cue to scroll`);
        }
        continue;
      }
      if (wider(box)) out.push(`${describe(box)}: ${box.scrollWidth} px of content in ${box.clientWidth} px`);
      for (const el of box.querySelectorAll('*')) {
        if (el.closest('.visually-hidden')) continue;
        const scroller = el.closest('.table-wrap');
        if (scroller && scroller !== box && box.contains(scroller) && wider(scroller)) continue;
        const r = el.getBoundingClientRect();
        if (r.width === 0 && r.height === 0) continue;
        if (r.left < b.left - 1 || r.right > b.right + 1) {
          out.push(`${describe(el)} (${Math.round(r.left)} to ${Math.round(r.right)} px) overflows ${describe(box)} (${Math.round(b.left)} to ${Math.round(b.right)} px)`);
        }
      }
    }
    const traffic = document.querySelector('#visits-table')?.closest('.table-wrap');
    if (traffic && wider(traffic)) out.push(`the per-visit traffic table needs ${traffic.scrollWidth} px in ${traffic.clientWidth} px`);
    const root = document.documentElement;
    if (wider(root)) out.push(`the page is ${root.scrollWidth} px wide in ${root.clientWidth} px`);
    return out;
  });
  for (const f of found) problems.push(`${name}: does not fit: ${f}`);
}

/** The text of the toast (the polite live region), after its short announcement delay. */
async function toast(page) {
  await page.waitForTimeout(100);
  return (await page.locator('#status').textContent()).trim();
}

/** The message the page announces next: waits for it (a loaded machine may take a while), then reads it. */
async function announced(page) {
  await page.waitForFunction(() => document.getElementById('status').textContent.trim() !== '', null,
    { timeout: 10000 }).catch(() => {});
  return toast(page);
}

async function shot(page, name) {
  await accessibility(page, name);
  await fits(page, name);
  // Toasts come and go; they are emptied (hidden) so that they do not cover the page.
  await page.evaluate(() => document.querySelectorAll('.toast').forEach((t) => t.replaceChildren()));
  await page.screenshot({ path: join(SHOTS, `${name}.png`), fullPage: true });
}

async function login(page, email, password, home) {
  await page.goto('/');
  await page.waitForURL('**/login**');
  await page.getByLabel('Email').fill(email);
  await page.getByLabel('Password').fill(password);
  await page.getByRole('button', { name: 'Log in' }).click();
  await page.waitForURL(`**${home}`);
}

function run(args, name) {
  const child = spawn(AGENT_BIN, args, { stdio: ['ignore', 'pipe', 'pipe'] });
  const log = [];
  child.stdout.on('data', (d) => log.push(d.toString()));
  child.stderr.on('data', (d) => log.push(d.toString()));
  child.log = log;
  child.name = name;
  children.push(child);
  return child;
}

function exited(child) {
  return new Promise((resolve) => {
    if (child.exitCode !== null) resolve(child.exitCode);
    else child.on('exit', (code) => resolve(code));
  });
}

async function until(what, poll, timeoutMs = 60_000) {
  const end = Date.now() + timeoutMs;
  for (;;) {
    const value = await poll();
    if (value) return value;
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 200));
  }
}

/** The text of every cell of `table`'s body, row by row. */
async function bodyCells(table) {
  return table.locator('tbody tr').evaluateAll((rows) =>
    rows.map((r) => [...r.querySelectorAll('th, td')].map((c) => c.textContent.trim())));
}

/**
 * The job page's test results match the API's: the kind of split is said, the majority-class
 * rate stands next to accuracy, and the confusion matrices of the hospital and of the pooled
 * round hold the counts the agent reported, with each class's sensitivity.
 */
async function testResults(page, jobUrl) {
  step('the test results show the kind of split, the majority-class rate and the confusion matrices');
  const id = jobUrl.split('/').pop();
  const metrics = await page.evaluate(async (job) => (await fetch(`/v1/jobs/${job}/metrics`)).json(), id);
  const kind = page.locator('#eval-kind');
  check((await kind.getAttribute('data-kind')) === 'patient', 'the agent splits by patient');
  check((await kind.textContent()).includes('Split by patient'), `kind labelled: ${await kind.textContent()}`);
  const pct = (x) => `${(x * 100).toFixed(2)}%`;
  for (const round of [ROUNDS - 1, 0]) {
    if (round !== ROUNDS - 1) await page.locator('#results-round').selectOption(String(round));
    const visit = metrics.visits.find((v) => v.round === round && v.hospital === HOSPITAL);
    const e = visit.test_evaluation;
    const pooled = metrics.rounds.find((r) => r.round === round).pooled_test_evaluation;
    await until(`round ${round + 1}'s results`, async () =>
      (await page.locator('#results-table caption').textContent()).startsWith(`Round ${round + 1}:`));
    const rows = await bodyCells(page.locator('#results-table'));
    check(rows.length === 2 && rows[0][0] === HOSPITAL && rows[1][0].includes('pooled'), `rows: ${rows}`);
    const [, split, beats, accuracy, majority] = rows[0];
    check(split === 'by patient', `split column: ${split}`);
    check(Number(beats.replace(/\D/g, '')) === visit.test_samples, `beats ${beats} vs ${visit.test_samples}`);
    check(accuracy === pct(visit.test_accuracy), `accuracy ${accuracy} vs ${visit.test_accuracy}`);
    check(majority === pct(e.majority_rate) && e.majority_rate > 0 && e.majority_rate < 1,
      `majority-class rate ${majority} vs ${e.majority_rate}`);
    for (const [tableId, expected] of [['#confusion-0', e], ['#confusion-pooled', pooled]]) {
      const cells = await bodyCells(page.locator(tableId));
      check(cells.length === expected.classes.length, `${tableId}: one row per class`);
      let total = 0;
      cells.forEach((row, i) => {
        check(row[0] === expected.classes[i], `${tableId} row ${i}: ${row[0]}`);
        const counts = row.slice(1, 1 + expected.classes.length).map((c) => Number(c.replace(/\D/g, '')));
        check(JSON.stringify(counts) === JSON.stringify(expected.confusion[i]),
          `${tableId} row ${row[0]}: ${counts} vs ${expected.confusion[i]}`);
        total += counts.reduce((a, b) => a + b, 0);
        const c = expected.per_class[row[0]];
        check(row[row.length - 2] === pct(c.se), `${tableId} ${row[0]} sensitivity ${row[row.length - 2]} vs ${c.se}`);
      });
      check(total === visit.test_samples, `${tableId} counts ${total} beats, the test set has ${visit.test_samples}`);
    }
  }
  await page.locator('#results-round').selectOption(String(ROUNDS - 1));
  await until('the last round shown again', async () =>
    (await page.locator('#results-table caption').textContent()).startsWith(`Round ${ROUNDS}:`));
}

/** The entries of the job summary under `root`: term → text. */
async function specEntries(root) {
  return Object.fromEntries(await root.locator('.spec > div').evaluateAll((items) =>
    items.map((d) => [d.querySelector('dt').textContent.trim(), d.querySelector('dd').textContent.trim()])));
}

/** The summary of the configured job says what each hospital is asked to train. */
function configuredSummary(entries, where) {
  const expected = {
    Labels: 'The papers’: N, L, R, A, V',
    Preprocessing: 'Inter-patient (baseline removed, RR-interval features)',
    'Input per beat': '128 samples, then 4 RR-interval features',
    Model: 'M1 with a client tail (16 encrypted outputs)',
    'Convolution blocks (at the hospital)': '16 channels, kernel 7, pool 2; 8 channels, kernel 5, pool 2',
    'Cut layer': '260 values per beat, encrypted',
    'Coordinator’s layer': 'Linear 260 → 16, on ciphertexts',
    'Client tail (at the hospital)': 'LeakyReLU, Linear 16 → 5 classes',
    'Local work per visit': '50 batches (200 beats), continuing through the data from visit to visit',
    'Class weights': 'Balanced: each hospital weighs its classes inversely to their frequency',
    'Client learning rate': 'Adam, 0.002',
    'Batches in flight': '6: a hospital sends up to 6 batches before their replies arrive; each batch trains through layers up to 5 batches old',
  };
  for (const [term, text] of Object.entries(expected)) {
    check(entries[term] === text, `${where}: ${term} is "${entries[term]}", expected "${text}"`);
  }
}

async function main() {
  mkdirSync(SHOTS, { recursive: true });
  const browser = await chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: [
      '--no-sandbox',
      '--disable-gpu',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
      '--no-first-run',
    ],
  });
  try {
    await walkthrough(browser);
  } finally {
    await browser.close();
  }
}

async function walkthrough(browser) {
  // --- Platform admin: a hospital, its admin, a researcher.
  step('platform admin logs in');
  const admin = await openPage(browser, 'platform admin');
  await admin.goto('/');
  await admin.waitForURL('**/login**');
  await shot(admin, 'login');
  await login(admin, ADMIN.email, ADMIN.password, '/admin/hospitals');

  step('creates a hospital');
  await admin.getByLabel('Name').fill('not a valid name!');
  await admin.getByRole('button', { name: 'Create hospital' }).click();
  await admin.locator('.field-error').first().waitFor();
  await admin.getByLabel('Name').fill(HOSPITAL);
  await admin.getByRole('button', { name: 'Create hospital' }).click();
  await admin.getByRole('cell', { name: HOSPITAL, exact: true }).waitFor();
  await shot(admin, 'admin-hospitals');

  step('creates a hospital admin and a researcher');
  await admin.getByRole('link', { name: 'Users' }).click();
  await admin.waitForURL('**/admin/users');
  const newUser = async (email, role, hospital) => {
    await admin.getByLabel('Email').fill(email);
    await admin.getByLabel('Password').fill(PASSWORD);
    await admin.getByLabel('Role').selectOption(role);
    if (hospital) await admin.getByLabel('Hospital').selectOption({ label: hospital });
    await admin.getByRole('button', { name: 'Create user' }).click();
    await admin.getByRole('cell', { name: email, exact: true }).waitFor();
  };
  await newUser(HOSPITAL_ADMIN, 'hospital_admin', HOSPITAL);
  await newUser(RESEARCHER, 'researcher', null);
  await shot(admin, 'admin-users');

  // --- Hospital admin: enrol a real agent through the dashboard.
  step('hospital admin logs in and creates an enrolment token');
  const ward = await openPage(browser, 'hospital admin');
  await login(ward, HOSPITAL_ADMIN, PASSWORD, '/hospital');
  await ward.getByText('No agents enrolled yet', { exact: false }).waitFor();
  await ward.getByRole('button', { name: 'Create enrolment token' }).click();
  const command = (await ward.locator('#enrol-command').textContent()).trim();
  check(
    command.startsWith(`medsplit-agent enrol --coordinator ${BASE} --token `)
      && command.endsWith(' --state-dir /var/lib/medsplit-agent'),
    `enrol command shown, with the operations guide's state directory: ${command}`,
  );
  await shot(ward, 'hospital-enrolment-token');

  step('a medsplit-agent process redeems it');
  const stateDir = join(WORK, 'agent-state');
  // The page's command names the operations guide's state directory; this run uses its own.
  const args = command.split(/\s+/).slice(1);
  const dirAt = args.indexOf('--state-dir');
  if (dirAt >= 0) args[dirAt + 1] = stateDir;
  else args.push('--state-dir', stateDir);
  check(
    (await ward.locator('#agent-run').textContent()) === 'medsplit-agent run --config /etc/medsplit/agent.toml',
    'the enrolment card says how to start the agent',
  );
  const enrol = run([...args, '--name', 'ward-7'], 'enrol');
  const enrolled = await exited(enrol);
  check(enrolled === 0, `medsplit-agent enrol exited ${enrolled}: ${enrol.log.join('')}`);
  const config = join(WORK, 'agent.toml');
  writeFileSync(
    config,
    `state_dir = "${stateDir}"\n\n[[sources]]\nformat = "synthetic"\npatients = 10\nbeats = 4000\nseed = 7\n\n` +
      // Three test patients whose dominant beats are N, L and R: every class has test beats.
      `[split]\ntest_patients = ["syn7-3", "syn7-7", "syn7-8"]\n`,
  );
  const agent = run(['run', '--config', config], 'agent');

  step('the agent shows as online');
  await ward.reload();
  const agentRow = ward.getByRole('row').filter({ hasText: 'ward-7' });
  await agentRow.getByText('Online', { exact: true }).waitFor({ timeout: 30_000 });
  check((await agentRow.textContent()).includes('0.'), 'agent version shown');

  step('an agent that never connects can be deleted');
  await ward.getByRole('button', { name: 'Create enrolment token' }).click();
  await ward.locator('#enrol-command').filter({ hasNotText: command }).waitFor();
  const ghostArgs = (await ward.locator('#enrol-command').textContent()).trim().split(/\s+/).slice(1);
  ghostArgs[ghostArgs.indexOf('--state-dir') + 1] = join(WORK, 'ghost-state');
  const ghost = run([...ghostArgs, '--name', 'ghost'], 'ghost enrol');
  check((await exited(ghost)) === 0, `medsplit-agent enrol exited: ${ghost.log.join('')}`);
  const ghostRow = ward.getByRole('row').filter({ hasText: 'ghost' });
  await ghostRow.getByRole('button', { name: /Delete/ }).waitFor();
  check((await agentRow.getByRole('button', { name: /Delete/ }).count()) === 0, 'a connected agent cannot be deleted');
  await shot(ward, 'hospital-agents');
  await ghostRow.getByRole('button', { name: /Delete/ }).click();
  await ghostRow.waitFor({ state: 'detached' });
  check((await announced(ward)).includes('deleted'), 'the deletion is announced');

  // --- Researcher: a job from the form, validated like the API.
  step('researcher submits a job from the form');
  const researcher = await openPage(browser, 'researcher');
  // By keyboard alone: the first Tab stop skips to the content; the form submits on Enter.
  await researcher.goto('/login');
  await researcher.keyboard.press('Tab');
  const first = await researcher.evaluate(() => document.activeElement.textContent.trim());
  check(first === 'Skip to content', `first Tab stop is the skip link, not ${first}`);
  await researcher.getByLabel('Email').focus();
  await researcher.keyboard.type(RESEARCHER);
  await researcher.keyboard.press('Tab');
  await researcher.keyboard.type(PASSWORD);
  await researcher.keyboard.press('Enter');
  await researcher.waitForURL('**/jobs');
  check((await announced(researcher)).startsWith('Logged in as'), 'the log-in is announced');
  await researcher.getByRole('link', { name: 'New job' }).click();
  await researcher.waitForURL('**/jobs/new');
  const fieldError = async (id) => {
    const control = researcher.locator(`#${id}[aria-invalid="true"]`);
    await control.waitFor();
    const described = await control.getAttribute('aria-describedby');
    return researcher.locator(`[id="${described}"]`).textContent();
  };
  const stale = await toast(researcher);
  check(stale === '', `no message of the last page on the job form: ${stale}`);
  // A name that would show as "live": refused next to the field.
  await researcher.locator('#job-name').fill('\u202e\u200bevil');
  await researcher.getByRole('checkbox', { name: HOSPITAL }).check();
  await researcher.getByRole('button', { name: 'Submit job' }).click();
  const nameMessage = await fieldError('job-name');
  check(nameMessage.includes('control or formatting characters (U+202E at character 1)'), `name error: ${nameMessage}`);
  await researcher.locator('#job-name').fill('Arrhythmia M1, cyclic');
  // The synthetic patients' beats are of the papers' five classes: under AAMI's, F and Q would
  // have no test beats to plot.
  await researcher.getByLabel('Label set').selectOption('papers');
  await researcher.getByRole('checkbox', { name: HOSPITAL }).check();
  // Three passes per visit, so that each visit lasts a few of the page's 2-second updates.
  await researcher.locator('#job-local-epochs').fill('3');
  await researcher.locator('#job-rounds').fill('0');
  // 2^53 + 1: a JavaScript number would silently make it 2^53.
  await researcher.locator('#job-seed').fill('9007199254740993');
  await researcher.getByRole('button', { name: 'Submit job' }).click();
  const message = await fieldError('job-rounds');
  check(message.includes('between 1 and 1000'), `rounds error next to the field: ${message}`);
  const seedMessage = await fieldError('job-seed');
  check(
    seedMessage.includes('9007199254740991') && seedMessage.includes('got 9007199254740993'),
    `seed error next to the field, with the seed as typed: ${seedMessage}`,
  );
  await shot(researcher, 'researcher-job-form');
  await researcher.locator('#job-rounds').fill(String(ROUNDS));
  await researcher.locator('#job-seed').fill(MAX_SEED);
  await researcher.getByRole('button', { name: 'Submit job' }).click();
  await researcher.waitForURL(/\/jobs\/\d+$/);
  const jobUrl = researcher.url();
  await researcher.getByText('pending', { exact: false }).first().waitFor();
  const seedShown = await researcher
    .locator('.spec div')
    .filter({ has: researcher.locator('dt', { hasText: /^Seed$/ }) })
    .locator('dd')
    .textContent();
  check(seedShown === MAX_SEED, `the job shows the seed it was given (${seedShown})`);

  // --- Hospital admin approves it.
  step('hospital admin approves the job');
  await ward.getByRole('link', { name: 'Consent' }).click();
  await ward.waitForURL('**/hospital/jobs');
  const pending = ward.getByRole('region', { name: 'Arrhythmia M1, cyclic' });
  const jobId = jobUrl.split('/').pop();
  const requested = await pending.locator('.requested').textContent();
  check(requested.startsWith(`Job ${jobId}, requested by ${RESEARCHER} on `), `the consent card tells jobs apart: ${requested}`);
  // The agent trains only jobs approved on its own host: the admin approves there too, after
  // checking that the agent shows the digest the consent card shows, and the agent's key.
  const digest = (await pending.locator('code.digest').textContent()).trim();
  check(/^[0-9a-f]{64}$/.test(digest), `the consent card shows the job's digest: ${digest}`);
  const approve = run(['approve', jobId, '--yes', '--config', config], 'approve');
  check((await exited(approve)) === 0, `medsplit-agent approve exited: ${approve.log.join('')}`);
  check(approve.log.join('').includes(digest), `the agent shows the same digest: ${approve.log.join('')}`);
  const keys = run(['keys', '--config', config], 'keys');
  check((await exited(keys)) === 0, `medsplit-agent keys exited: ${keys.log.join('')}`);
  const ownKey = keys.log.join('').match(/this agent\s+\d+\s+([0-9a-f ]{39})/)?.[1];
  const sealedTo = await pending.getByRole('table', { name: /sealed to/ }).textContent();
  check(ownKey && sealedTo.includes('ward-7') && sealedTo.includes(ownKey),
    `the consent card shows the agent's key fingerprint (${ownKey}): ${sealedTo}`);
  await shot(ward, 'hospital-consent');
  await pending.getByRole('button', { name: 'Approve' }).click();
  await ward.getByText('approved', { exact: false }).first().waitFor();

  // --- Researcher watches the plots gain points until the job finishes.
  step('researcher watches the job');
  const points = researcher.locator('svg#plot-accuracy circle.point');
  const lossPoints = researcher.locator('svg#plot-loss circle.point');
  const sensitivityPoints = researcher.locator('svg#plot-sensitivity circle.point');
  const seen = new Set();
  await until(
    'the job to complete',
    async () => {
      seen.add(await points.count());
      const status = await researcher.locator('.job-status').first().textContent();
      return /completed/i.test(status);
    },
    240_000,
  );
  // The last poll of the page may land after the status flip; wait for the final figures:
  // per round, the hospital's test accuracy, the mean and the majority-class rate; the
  // hospital's training loss; the sensitivity of each of the five classes.
  await until(
    'all rounds plotted',
    async () => (await points.count()) === 3 * ROUNDS && (await lossPoints.count()) === ROUNDS
      && (await sensitivityPoints.count()) === 5 * ROUNDS,
  );
  await testResults(researcher, jobUrl);
  step('the privacy card shows what the coordinator saw and what an attacker recovers from it');
  const seenTable = researcher.locator('#privacy-seen');
  await seenTable.waitFor();
  const seenText = await seenTable.textContent();
  check(seenText.includes('Backward') && seenText.includes('InputGradients') && seenText.includes('in plaintext'),
    `what the coordinator saw: ${seenText}`);
  const attackCaption = await researcher.locator('#privacy-attack caption').textContent();
  check(attackCaption.includes('without DP'), `the attack figures of the job's setting: ${attackCaption}`);
  check((await researcher.locator('#privacy-epsilon').textContent()).includes('No differential privacy'),
    'a job without DP says that nothing bounds ε');
  seen.add(await points.count());
  const counts = [...seen].sort((a, b) => a - b);
  step(`accuracy points seen while running: ${counts.join(', ')}`);
  check(counts.length >= 3, `the plot gained points one round at a time (${counts})`);
  // Events count rounds from 1, like the rest of the page, and show figures rounded.
  const eventsText = await researcher.locator('#job-events').textContent();
  check(
    eventsText.includes(`round 1 at ${HOSPITAL}`) && eventsText.includes(`round ${ROUNDS} at ${HOSPITAL}`)
      && !eventsText.includes(`round ${ROUNDS + 1}`) && !/round:? 0\b/.test(eventsText),
    `rounds counted from 1 in the events: ${eventsText}`,
  );
  check(!/\d\.\d{5,}/.test(eventsText), `no raw floats in the events: ${eventsText}`);
  await shot(researcher, 'researcher-job-detail');

  const phone = await openPage(browser, 'researcher (phone)', { width: 390, height: 844 });
  await login(phone, RESEARCHER, PASSWORD, '/jobs');
  await phone.goto(jobUrl);
  await phone.locator('svg#plot-accuracy circle.point').first().waitFor();
  // Per-visit traffic: a table on a wide screen, cards on a phone (both must fit: see fits()).
  check((await researcher.locator('#visits-table').count()) === 1, 'the traffic table on a wide screen');
  await phone.locator('#visits-list .visit-card').first().waitFor();
  await shot(phone, 'researcher-job-detail-phone');
  await researcher.goto('/jobs');
  await researcher.getByRole('link', { name: 'Arrhythmia M1, cyclic' }).waitFor();
  await shot(researcher, 'researcher-jobs');

  step('researcher configures a second job: labels, preprocessing, preset, class weights, client learning rate, local steps');
  const CONFIGURED = 'Tail model, cancelled before consent';
  await researcher.goto('/jobs/new');
  await researcher.locator('#job-name').fill(CONFIGURED);
  await researcher.getByRole('checkbox', { name: HOSPITAL }).check();
  await researcher.getByLabel('Model', { exact: true }).selectOption('m1_tail');
  check(await researcher.getByLabel('Label set').inputValue() === 'aami', 'the label set is AAMI unless chosen');
  check(await researcher.getByLabel('Preprocessing').inputValue() === 'papers', 'the papers’ preprocessing unless chosen');
  await researcher.getByLabel('Label set').selectOption('papers');
  await researcher.getByLabel('Preprocessing').selectOption('inter_patient');
  await researcher.getByLabel('Class weights').selectOption('balanced');
  check(await researcher.locator('#job-local-steps').isHidden(), 'local steps hidden while epochs are chosen');
  await researcher.getByLabel('Local work per visit').selectOption('steps');
  check(await researcher.locator('#job-local-epochs').isHidden(), 'local epochs hidden once steps are chosen');
  await researcher.locator('#job-local-steps').fill('50');
  check(await researcher.getByLabel('Batches in flight').inputValue() === '4', 'four batches in flight unless chosen');
  await researcher.getByLabel('Batches in flight').fill('6');
  await researcher.locator('#job-client-lr').fill('2');
  await researcher.getByRole('button', { name: 'Submit job' }).click();
  const lrMessage = await fieldError('job-client-lr');
  check(lrMessage.includes('must be in (0, 1], got 2'), `client learning rate error next to the field: ${lrMessage}`);
  await researcher.locator('#job-client-lr').fill('0.002');
  await researcher.getByRole('button', { name: 'Submit job' }).click();
  await researcher.waitForURL(/\/jobs\/\d+$/);
  const configuredId = researcher.url().split('/').pop();
  const sent = await researcher.evaluate(async (id) => (await fetch(`/v1/jobs/${id}`)).json(), configuredId);
  check(sent.spec.model.preset === 'm1_tail' && sent.spec.local_steps === 50 && sent.spec.local_epochs === 1
    && sent.spec.class_weights === 'balanced' && sent.spec.client_lr === 0.002 && sent.spec.batches_in_flight === 6
    && sent.spec.labels === 'papers' && sent.spec.preprocessing.lead === 'MLII'
    && sent.spec.preprocessing.rr?.local_beats === 10 && sent.network.preprocessing === 'inter_patient',
  `the form sent: ${JSON.stringify(sent.spec)}`);
  await researcher.locator('.spec').waitFor();
  configuredSummary(await specEntries(researcher.locator('main')), 'job page');

  step('the hospital admin sees the same on the consent card');
  const configuredCard = ward.getByRole('region', { name: CONFIGURED });
  await configuredCard.locator('.spec').waitFor();
  configuredSummary(await specEntries(configuredCard), 'consent card');
  await accessibility(ward, 'hospital-consent-configured');

  step('researcher cancels it before it starts');
  await researcher.getByRole('button', { name: 'Cancel job' }).click();
  await until('the job to show as cancelled', async () =>
    /cancelled/i.test(await researcher.locator('.job-status').first().textContent()));

  // --- Hospital admin caps the hospital's ε: checked next to the field, stored, then removed.
  step('hospital admin sets and removes the hospital\'s maximum ε');
  await ward.getByRole('link', { name: 'Agents' }).click();
  await ward.waitForURL('**/hospital');
  const maxField = ward.getByLabel('Maximum ε per job');
  await ward.locator('#max-epsilon-current').filter({ hasText: 'No maximum' }).waitFor();
  await maxField.fill('-1');
  await ward.getByRole('button', { name: 'Save maximum' }).click();
  await ward.locator('#max-epsilon[aria-invalid="true"]').waitFor();
  await maxField.fill('6');
  await ward.getByRole('button', { name: 'Save maximum' }).click();
  check((await announced(ward)).includes('Maximum ε set to 6'), 'the maximum is announced');
  await ward.locator('#max-epsilon-current').filter({ hasText: 'At most ε = 6' }).waitFor();
  const stored = await ward.evaluate(async () => (await fetch('/v1/hospitals')).json());
  check(stored.find((x) => x.name === HOSPITAL)?.max_epsilon === 6, `the maximum is stored: ${JSON.stringify(stored)}`);
  await shot(ward, 'hospital-privacy-budget');
  await maxField.fill('');
  await ward.getByRole('button', { name: 'Save maximum' }).click();
  await ward.locator('#max-epsilon-current').filter({ hasText: 'No maximum' }).waitFor();
  // Away and back: the revocation's announcement below is the only one on the page.
  await ward.getByRole('link', { name: 'Job consent' }).click();
  await ward.waitForURL('**/hospital/jobs');

  // --- Hospital admin revokes the agent; the page shows it, and the agent stops at once.
  step('hospital admin revokes the agent');
  await ward.getByRole('link', { name: 'Agents' }).click();
  await ward.waitForURL('**/hospital');
  await agentRow.getByRole('button', { name: /Revoke/ }).click();
  await agentRow.getByText('Revoked', { exact: true }).waitFor();
  check((await announced(ward)).includes('revoked'), 'the revocation is announced');
  // The message belongs to the agents page: it goes with it.
  await ward.getByRole('link', { name: 'Job consent' }).click();
  await ward.waitForURL('**/hospital/jobs');
  const left = await toast(ward);
  check(left === '', `no message of the agents page on the consent page: ${left}`);
  await ward.getByRole('link', { name: 'Agents' }).click();
  await ward.waitForURL('**/hospital');
  await agentRow.getByText('Revoked', { exact: true }).waitFor();
  await shot(ward, 'hospital-agents-revoked');
  // Idle in a 25 s long poll, the agent stops at its first refused heartbeat (every 5 s).
  const code = await Promise.race([exited(agent), new Promise((r) => setTimeout(() => r('running'), 15_000))]);
  check(code === 1, `the revoked agent exited with status 1, not ${code}: ${agent.log.join('').slice(-2000)}`);
  check(agent.log.join('').includes('revoked'), 'the agent says it was revoked');

  // --- The audit trail has it all; logging out ends the session.
  step('platform admin reads the audit trail');
  await admin.getByRole('link', { name: 'Audit' }).click();
  await admin.waitForURL('**/admin/audit');
  await admin.getByRole('cell', { name: 'agent.revoke' }).waitFor();
  await admin.getByRole('cell', { name: 'agent.delete' }).waitFor();
  await shot(admin, 'admin-audit');

  step('logging out ends the session');
  await researcher.getByRole('button', { name: 'Log out' }).click();
  await researcher.waitForURL('**/login**');
  const me = await researcher.evaluate(async () => (await fetch('/v1/me')).json());
  check(me.authenticated === false, 'no session after logging out');
  await researcher.goto(jobUrl);
  await researcher.waitForURL('**/login**');
}

try {
  await main();
  if (problems.length) throw new Error(`errors in the browser:\n  ${problems.join('\n  ')}`);
  step('passed');
} catch (e) {
  for (const c of children) {
    if (c.log.length) console.error(`--- ${c.name} output ---\n${c.log.join('').slice(-4000)}`);
  }
  if (problems.length) console.error(`browser problems:\n  ${problems.join('\n  ')}`);
  console.error(e.stack ?? String(e));
  process.exitCode = 1;
} finally {
  for (const c of children) if (c.exitCode === null) c.kill('SIGKILL');
}
