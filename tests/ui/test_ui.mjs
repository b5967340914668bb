/*
 * The web playground (server/ui/, served at GET /) in a real browser:
 * headless Debian Chromium driven by playwright-core (no browser download).
 * Run by `make test-ui` through tests/ui/run.sh, which installs the pinned
 * playwright-core into tests/ui/node_modules.
 *
 * Starts $NZSERVE (default build/nzserve) itself, on 127.0.0.1 with a free
 * port, with the bundled demo models (models/demo/) and a config file of its
 * own, and checks:
 *   1. the page loads with its Content-Security-Policy, no console error and
 *      no CSP violation; the model pickers and the memory panel fill in;
 *   2. Translate: a sentence gets a non-empty translation with timings;
 *   3. Chat (tabs switched with the arrow keys): a two-turn conversation;
 *      every round shows K answers (K = the dialogue model's num_modes from
 *      /v1/models) with ranks, the text grew while streaming, and a picked
 *      answer is the next turn of the context sent; a third turn with beam
 *      search sends the beam size and length penalty set in the options;
 *   4. a 375 px wide viewport: the chat works and nothing overflows sideways;
 *   5. a second server with an API key: the page shows the 401 message, a
 *      wrong key is refused, the right one typed into the page works (a
 *      translation, and two chat turns: without a pick the top-ranked answer
 *      is the next turn).
 * Screenshots go to $UI_SCREENS (default build/ui-screens/): translate.png,
 * chat.png, phone.png, api-key.png. docs/playground.png is a copy of
 * chat.png (refresh it by hand: cp build/ui-screens/chat.png docs/playground.png).
 *
 * Everything is bounded: a watchdog ends the run (and the servers) after
 * UI_TEST_TIMEOUT_S (240 s), every wait has a timeout, and each server runs
 * under `timeout` so none can outlive the test.
 *
 * Environment: NZSERVE, UI_SCREENS, CHROMIUM (default /usr/bin/chromium),
 * UI_TEST_TIMEOUT_S.
 */
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

const REPO = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
const NZSERVE = process.env.NZSERVE || path.join(REPO, 'build', 'nzserve');
const SCREENS = process.env.UI_SCREENS || path.join(REPO, 'build', 'ui-screens');
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
const TEST_TIMEOUT_S = Number(process.env.UI_TEST_TIMEOUT_S || 240);
const HOST = '127.0.0.1';
const API_KEY = 'ui-test-key-0001';
const STEP_DELAY_MS = 20; // NZSERVE_DEBUG_STEP_DELAY_MS: decoder steps slow enough to watch tokens arrive
const WAIT_MS = 30000; // the longest single wait in the page

const t0 = Date.now();
const servers = [];
let browser = null;

// ---------------------------------------------------------------- reporting

let checks = 0;

function ok(cond, what) {
    if (!cond) throw new Error('check failed: ' + what);
    checks++;
}

function step(name) {
    console.log(`[${((Date.now() - t0) / 1000).toFixed(1)} s] ${name}`);
}

// ---------------------------------------------------------------- servers

/** Start nzserve with the demo models on a free loopback port. @return {port, url, log(), stop()}. */
async function startServer(extraConfig = {}) {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'nzserve-ui-'));
    const config = {
        host: HOST,
        port: 0,
        worker_threads: 1,
        http_threads: 2,
        models: [
            { name: 'nat-ende', task: 'translate', path: path.join(REPO, 'models/demo/nat-ende.nzp') },
            { name: 'dialogue', task: 'dialogue', path: path.join(REPO, 'models/demo/dialogue.nzp') },
        ],
        tile_cache_bytes: '64MiB',
        connection_timeout_s: 10,
        shutdown_grace_ms: 2000,
        log_format: 'logfmt',
        ...extraConfig,
    };
    const cfgPath = path.join(dir, 'nzserve.json');
    fs.writeFileSync(cfgPath, JSON.stringify(config));
    // no NZSERVE_* setting of the caller's shell may change the test
    const env = Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith('NZSERVE')));
    env.NZSERVE_DEBUG_STEP_DELAY_MS = String(STEP_DELAY_MS);
    // `timeout` bounds the server's life even if this process is killed outright
    const proc = spawn('timeout', ['-k', '5', String(TEST_TIMEOUT_S + 30), NZSERVE, '--config', cfgPath], {
        cwd: dir,
        env,
        stdio: ['ignore', 'ignore', 'pipe'],
    });
    let log = '';
    proc.stderr.setEncoding('utf8');
    proc.stderr.on('data', (d) => {
        log += d;
    });
    const srv = {
        proc,
        port: 0,
        log: () => log,
        url: (p = '/') => `http://${HOST}:${srv.port}${p}`,
        async stop() {
            if (proc.exitCode !== null || proc.signalCode !== null) return;
            const exited = new Promise((r) => proc.once('exit', r));
            proc.kill('SIGTERM');
            const timer = setTimeout(() => proc.kill('SIGKILL'), 5000);
            await exited;
            clearTimeout(timer);
            fs.rmSync(dir, { recursive: true, force: true });
        },
    };
    servers.push(srv);
    // the port from the event=listening line
    const deadline = Date.now() + 20000;
    while (!srv.port) {
        const m = log.match(/event=listening\b.*\bport=(\d+)/);
        if (m) srv.port = Number(m[1]);
        else if (proc.exitCode !== null) throw new Error(`nzserve exited with ${proc.exitCode}:\n${log}`);
        else if (Date.now() > deadline) throw new Error(`nzserve did not listen within 20 s:\n${log}`);
        else await sleep(20);
    }
    // then ready (models loaded)
    while (true) {
        try {
            const r = await fetch(srv.url('/ready'), { signal: AbortSignal.timeout(5000) });
            if (r.status === 200) break;
        } catch (e) {
            /* not yet */
        }
        if (Date.now() > deadline) throw new Error(`nzserve not ready within 20 s:\n${log}`);
        await sleep(50);
    }
    return srv;
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function cleanup() {
    if (browser) await browser.close().catch(() => {});
    browser = null;
    await Promise.all(servers.map((s) => s.stop().catch(() => {})));
}

// the watchdog, and signals: never leave a server or a browser behind
const watchdog = setTimeout(async () => {
    console.error(`FAIL: the browser test did not finish within ${TEST_TIMEOUT_S} s`);
    await cleanup();
    process.exit(1);
}, TEST_TIMEOUT_S * 1000);
for (const sig of ['SIGINT', 'SIGTERM']) {
    process.on(sig, async () => {
        await cleanup();
        process.exit(1);
    });
}

// ---------------------------------------------------------------- page helpers

/**
 * A page that records what must not happen: console errors (except failed
 * loads with an HTTP status listed in page.allowStatus), uncaught errors and
 * CSP violations (a listener installed before the page's own scripts).
 */
async function newPage(context) {
    const page = await context.newPage();
    page.setDefaultTimeout(WAIT_MS);
    page.problems = [];
    page.allowStatus = new Set();
    page.on('console', (m) => {
        if (m.type() !== 'error') return;
        const st = m.text().match(/Failed to load resource: the server responded with a status of (\d+)/);
        if (st && page.allowStatus.has(Number(st[1]))) return;
        page.problems.push('console error: ' + m.text());
    });
    page.on('pageerror', (e) => page.problems.push('page error: ' + e.message));
    await page.addInitScript(() => {
        window.__csp = [];
        document.addEventListener('securitypolicyviolation', (e) => {
            window.__csp.push(`${e.violatedDirective} blocked ${e.blockedURI || '(inline)'} at ${e.sourceFile}:${e.lineNumber}`);
        });
    });
    return page;
}

/** No console error, page error or CSP violation so far. */
async function checkClean(page, where) {
    const csp = await page.evaluate(() => window.__csp);
    ok(csp.length === 0, `${where}: no CSP violation (got ${JSON.stringify(csp)})`);
    ok(page.problems.length === 0, `${where}: no console or page error (got ${JSON.stringify(page.problems)})`);
}

/** Load the page and wait until the model pickers are filled. */
async function openPlayground(page, srv, expectModels = 'loaded') {
    const resp = await page.goto(srv.url('/'), { timeout: WAIT_MS });
    ok(resp.status() === 200, 'GET / is 200');
    const csp = resp.headers()['content-security-policy'] || '';
    ok(csp.includes("script-src 'self'") && csp.includes("default-src 'none'"), 'GET / carries the strict CSP: ' + csp);
    await page.waitForSelector(`body[data-models="${expectModels}"]`);
}

/** Open the chat's decoding options (a closed <details>) and bound the answers' length. */
async function chatOptions(page, maxNewTokens) {
    if (!(await page.locator('#chat-form details').evaluate((d) => d.open))) await page.click('#chat-form details > summary');
    await page.fill('#chat-max-new', String(maxNewTokens));
}

/**
 * Send msg in the chat and wait for the final event. @return {body: the request
 * sent, samples: [{state, total}] seen while the answers changed}.
 */
async function chatRound(page, msg, { pressEnter = false } = {}) {
    // watch the answer cards change: total text length per DOM update, with the round's state
    await page.evaluate(() => {
        const box = document.getElementById('chat-answers');
        window.__samples = [];
        if (window.__observer) window.__observer.disconnect();
        window.__observer = new MutationObserver(() => {
            let total = 0;
            for (const p of box.querySelectorAll('.answer-text')) total += p.textContent.length;
            window.__samples.push({ state: box.dataset.state, total });
        });
        window.__observer.observe(box, { subtree: true, childList: true, characterData: true, attributes: true });
    });
    await page.fill('#chat-input', msg);
    const req = page.waitForRequest((r) => r.url().endsWith('/v1/dialogue') && r.method() === 'POST');
    if (pressEnter) await page.press('#chat-input', 'Enter');
    else await page.click('#chat-send');
    const body = (await req).postDataJSON();
    // the round ends with the final event ("done") or an error shown in the page
    await page.waitForFunction(() => ['done', 'error'].includes(document.getElementById('chat-answers').dataset.state),
        null, { timeout: WAIT_MS });
    const state = await page.getAttribute('#chat-answers', 'data-state');
    ok(state === 'done', `chat round "${msg}" ends with its final event (got ${state}: ${await page.textContent('#chat-status')})`);
    const samples = await page.evaluate(() => {
        window.__observer.disconnect();
        return window.__samples;
    });
    return { body, samples };
}

/** The answer cards: [{decoder, rank, dropped, text}] in page order. */
function answers(page) {
    return page.$$eval('#chat-answers .answer', (cards) =>
        cards.map((c) => ({
            decoder: Number(c.dataset.decoder),
            rank: c.dataset.rank ? Number(c.dataset.rank) : null,
            dropped: c.classList.contains('dropped'),
            text: c.querySelector('.answer-text').textContent,
        })),
    );
}

/**
 * K cards, one per decoder: the answers ranked 1..n, and the K - n that the
 * distinct filter dropped (the model's default) marked as dropped, each with the
 * text of a ranked one. @return the cards.
 */
async function checkAnswers(page, K, where) {
    const a = await answers(page);
    ok(a.length === K, `${where}: ${K} answer cards (got ${a.length})`);
    ok(new Set(a.map((x) => x.decoder)).size === K, `${where}: one card per decoder`);
    const ranked = a.filter((x) => x.rank !== null);
    const ranks = ranked.map((x) => x.rank).sort((x, y) => x - y);
    ok(ranked.length >= 1 && ranks.join() === ranked.map((_, i) => i + 1).join(),
        `${where}: ranks 1..${ranked.length} (got ${ranks})`);
    const norm = (t) => t.trim().replace(/\s+/g, ' ').toLowerCase();
    ok(a.every((x) => (x.rank === null) === x.dropped), `${where}: every unranked card is marked dropped`);
    ok(a.filter((x) => x.dropped).every((x) => ranked.some((r) => norm(r.text) === norm(x.text))),
        `${where}: a dropped card repeats a ranked answer`);
    ok(a.some((x) => x.text.trim()), `${where}: some answer has text`);
    return a;
}

/** The text grew in several steps while streaming, before the final event. */
function checkStreamed(samples, where) {
    const streaming = samples.filter((s) => s.state === 'streaming' && s.total > 0).map((s) => s.total);
    const distinct = new Set(streaming);
    ok(distinct.size >= 2, `${where}: the answers grew token by token before the final event ` +
        `(text lengths seen while streaming: ${[...distinct].join(', ') || 'none'})`);
}

/** Nothing wider than the viewport. */
async function checkNoOverflow(page, where) {
    const w = await page.evaluate(() => ({
        inner: window.innerWidth,
        doc: document.documentElement.scrollWidth,
        body: document.body.scrollWidth,
    }));
    ok(w.doc <= w.inner && w.body <= w.inner, `${where}: no horizontal overflow (${JSON.stringify(w)})`);
}

// ---------------------------------------------------------------- the test

async function main() {
    for (const f of [NZSERVE, CHROMIUM]) if (!fs.existsSync(f)) throw new Error(`missing ${f}`);
    fs.mkdirSync(SCREENS, { recursive: true });

    step('start nzserve (demo models) and Chromium');
    const [srv, keySrv] = await Promise.all([startServer(), startServer({ api_keys: [API_KEY] })]);
    browser = await chromium.launch({ executablePath: CHROMIUM, timeout: WAIT_MS, args: ['--disable-gpu', '--disable-dev-shm-usage'] });
    const models = (await (await fetch(srv.url('/v1/models'))).json()).models;
    const dlg = models.find((m) => m.task === 'dialogue');
    const K = dlg.num_modes;
    ok(K >= 2, `the dialogue model has several decoders (K = ${K})`);

    // 1. desktop: load
    step('desktop: load the page');
    const desk = await browser.newContext({ viewport: { width: 1280, height: 900 } });
    const page = await newPage(desk);
    await openPlayground(page, srv);
    ok((await page.$$eval('#tr-model option', (o) => o.map((x) => x.value))).includes('nat-ende'), 'translate picker lists nat-ende');
    ok(await page.locator('#tr-decoder').inputValue() === models.find((m) => m.name === 'nat-ende').generation.decoder,
        "the translate options hold the model's default decoder");
    await page.waitForSelector('#mem-table:not([hidden]) #mem-body tr');
    ok((await page.textContent('#mem-body')).includes('process RSS'), 'the memory panel shows the RSS');

    // 2. translate
    step('desktop: translate');
    await page.fill('#tr-text', 'Open the file in a new window.');
    await page.click('#tr-go');
    await page.waitForSelector('#tr-result .tr-out');
    const out = (await page.textContent('#tr-result .tr-out')).trim();
    ok(out.length > 0, 'a non-empty translation');
    ok(/ms \(browser\).*server: queue/.test(await page.textContent('#tr-result .timing')), 'browser and server timings shown');
    console.log(`    "Open the file in a new window." -> "${out}"`);
    // mask-predict with the length-beam candidates asked for ("return_candidates"): listed, one chosen
    await page.selectOption('#tr-decoder', 'nat');
    await page.check('#tr-candidates');
    await page.click('#tr-go');
    await page.waitForFunction(() => !document.getElementById('tr-go').disabled && document.querySelector('#tr-result .tr-out'));
    const cands = await page.$$('#tr-result .cands li');
    ok(cands.length > 1, `length-beam candidates shown (${cands.length})`);
    ok((await page.textContent('#tr-result .tr-out')).trim().length > 0, 'mask-predict translation');
    await page.screenshot({ path: path.join(SCREENS, 'translate.png'), fullPage: true });
    await checkClean(page, 'translate');

    // 3. chat: tabs by keyboard, two turns
    step('desktop: chat, turn 1');
    await page.focus('#tab-translate');
    await page.keyboard.press('ArrowRight');
    ok(await page.getAttribute('#tab-chat', 'aria-selected') === 'true', 'ArrowRight selects the Chat tab');
    ok(await page.isVisible('#panel-chat') && !(await page.isVisible('#panel-translate')), 'the Chat panel shows alone');
    ok(await page.evaluate(() => document.activeElement.id) === 'tab-chat', 'focus follows the selected tab');
    ok(await page.locator('#chat-strategy').inputValue() === dlg.generation.strategy, "the chat options hold the model's default strategy");
    await chatOptions(page, 24);
    // greedy streams every decoder token by token (the default, beam ranked by consensus, sends each
    // decoder's chosen hypothesis once all beams are done: turn 3)
    await page.selectOption('#chat-strategy', 'greedy');
    const r1 = await chatRound(page, 'Where are you going?', { pressEnter: true });
    ok(r1.body.stream === true && r1.body.context.length === 1, 'turn 1: a streamed request with one turn');
    const a1 = await checkAnswers(page, K, 'turn 1');
    checkStreamed(r1.samples, 'turn 1');
    // the rank-2 answer continues the conversation
    const picked = a1.find((x) => x.rank === 2);
    await page.click(`#chat-answers .answer[data-rank="2"] button`);
    const log1 = await page.$$eval('#chat-log li', (l) => l.map((x) => x.textContent));
    ok(log1.length === 2 && log1[1].includes(picked.text), 'the picked answer is the second turn');

    step('desktop: chat, turn 2');
    const r2 = await chatRound(page, 'Why?');
    ok(r2.body.context.length === 3 && r2.body.context[1] === picked.text && r2.body.context[2] === 'Why?',
        'turn 2: the context is [turn 1, the picked answer, turn 2]');
    const a2 = await checkAnswers(page, K, 'turn 2');
    checkStreamed(r2.samples, 'turn 2');
    const n2 = a2.filter((x) => x.rank !== null).length;
    ok((await page.textContent('#chat-status')).includes(`${n2} answers`), 'the status counts the answers');
    await page.click('#chat-form details > summary'); // options closed again for the picture
    await page.screenshot({ path: path.join(SCREENS, 'chat.png'), fullPage: true });
    await checkClean(page, 'chat');

    step('desktop: chat, beam with a length penalty');
    await page.click('#chat-form details > summary');
    ok(Number(await page.locator('#chat-length-penalty').inputValue()) === dlg.generation.length_penalty,
        "the length penalty holds the model's default");
    await page.selectOption('#chat-strategy', 'beam');
    await page.fill('#chat-beam', '2');
    await page.fill('#chat-length-penalty', '1.5');
    const r3 = await chatRound(page, 'Thanks.');
    ok(r3.body.strategy === 'beam' && r3.body.beam_size === 2 && r3.body.length_penalty === 1.5,
        `turn 3: beam_size and length_penalty are sent (${JSON.stringify(r3.body)})`);
    await checkAnswers(page, K, 'turn 3');
    await desk.close();

    // 4. phone width
    step('375 px: chat');
    const phone = await browser.newContext({ viewport: { width: 375, height: 812 }, isMobile: true, hasTouch: true });
    const ppage = await newPage(phone);
    await openPlayground(ppage, srv);
    await checkNoOverflow(ppage, 'translate tab at 375 px');
    await ppage.click('#tab-chat');
    await chatOptions(ppage, 24);
    await chatRound(ppage, 'Tell me about the whale.');
    await checkAnswers(ppage, K, '375 px');
    await checkNoOverflow(ppage, 'chat at 375 px');
    const send = await ppage.locator('#chat-send').boundingBox();
    ok(send && send.x >= 0 && send.x + send.width <= 375, 'the Send button is within the screen');
    await ppage.screenshot({ path: path.join(SCREENS, 'phone.png'), fullPage: true });
    await checkClean(ppage, '375 px');
    await phone.close();

    // 5. a server with an API key
    step('API key: 401, wrong key, right key');
    const kctx = await browser.newContext({ viewport: { width: 1280, height: 900 } });
    const kpage = await newPage(kctx);
    kpage.allowStatus.add(401);
    await openPlayground(kpage, keySrv, 'error'); // the page's files need no key; /v1/models does
    await kpage.waitForSelector('#alert:not([hidden])');
    ok(/needs an API key/.test(await kpage.textContent('#alert')), 'the alert asks for an API key');
    await kpage.click('#tr-go');
    await kpage.waitForSelector('#tr-result .error');
    ok(/401/.test(await kpage.textContent('#tr-result .error')), 'translate shows the 401 error');
    await kpage.screenshot({ path: path.join(SCREENS, 'api-key.png'), fullPage: true });
    await kpage.fill('#api-key', 'wrong-key-0000');
    await kpage.click('#key-use');
    await kpage.waitForSelector('#alert:not([hidden])');
    await kpage.waitForFunction(() => /refused/.test(document.getElementById('alert').textContent));
    ok(true, 'a wrong key is refused');
    await kpage.fill('#api-key', API_KEY);
    await kpage.press('#api-key', 'Enter');
    await kpage.waitForSelector('body[data-models="loaded"]');
    ok(await kpage.isHidden('#alert'), 'the alert is gone with the right key');
    await kpage.click('#tr-go');
    await kpage.waitForSelector('#tr-result .tr-out');
    ok((await kpage.textContent('#tr-result .tr-out')).trim().length > 0, 'translation with the key');
    await kpage.click('#tab-chat');
    await chatOptions(kpage, 8);
    await chatRound(kpage, 'Hello there.');
    const ka = await checkAnswers(kpage, K, 'chat with the key');
    // going on without picking: the top-ranked answer is the next turn
    const kr = await chatRound(kpage, 'And then?');
    ok(kr.body.context.length === 3 && kr.body.context[1] === ka.find((x) => x.rank === 1).text,
        'without a pick, the top-ranked answer continues the conversation');
    await checkAnswers(kpage, K, 'chat with the key, turn 2');
    await checkClean(kpage, 'API key');
    await kctx.close();

    for (const s of servers) ok(s.proc.exitCode === null, 'the server is still running');
    console.log(`PASS: ${checks} checks in ${((Date.now() - t0) / 1000).toFixed(1)} s; screenshots in ${SCREENS}`);
}

let failed = false;
try {
    await main();
} catch (e) {
    failed = true;
    console.error('FAIL: ' + (e && e.stack ? e.stack : e));
    for (const s of servers) console.error(`--- nzserve log (port ${s.port}), last 2000 chars:\n` + s.log().slice(-2000));
} finally {
    clearTimeout(watchdog);
    await cleanup();
}
process.exit(failed ? 1 : 0);
