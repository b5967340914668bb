/*
 * nzserve playground — the page at GET / (server/ui/index.html).
 *
 * Plain browser JavaScript, no framework and no build step. The page talks
 * only to the server it came from (its Content-Security-Policy allows
 * nothing else) and uses:
 *   GET  /v1/models     the model pickers and each model's decoding defaults
 *   POST /v1/translate  the Translate tab
 *   POST /v1/dialogue   the Chat tab, with "stream": true: server-sent events
 *                       read from fetch() (EventSource cannot POST):
 *                         event: token  data: {"decoder", "token", "text"}
 *                         event: done   data: the whole JSON response
 *                         event: error  data: {"error": {...}}
 *   GET  /v1/memory     the live memory panel (polled while the page is visible)
 * An API key typed into the page is kept in one variable (never stored) and
 * sent as "Authorization: Bearer KEY". Errors are the server's JSON bodies,
 * {"error": {"code", "type", "message"}}, shown as they come.
 *
 * All text from the server goes into the page through textContent, never as
 * HTML.
 */
'use strict';

(() => {
    // ------------------------------------------------------------------ settings

    const MEMORY_POLL_MS = 3000; // memory panel refresh period while visible
    const MODELS_RETRY_MS = 2000; // re-read /v1/models while a model is still loading
    // The request field that asks /v1/translate for the length-beam candidates,
    // and the response field (per translation) that carries them. A server that
    // does not know the field answers 422 "unknown field": the page then says so
    // and stops asking.
    const CANDIDATES_FIELD = 'return_candidates';

    // ------------------------------------------------------------------ small helpers

    const $ = (id) => document.getElementById(id);

    /** Create an element with a class and text (text always via textContent). */
    function el(tag, className, text) {
        const e = document.createElement(tag);
        if (className) e.className = className;
        if (text !== undefined && text !== null) e.textContent = text;
        return e;
    }

    /** Bytes as "12.3 MiB" (binary units, like the server's settings). */
    function fmtBytes(n) {
        if (typeof n !== 'number' || !Number.isFinite(n)) return '–';
        const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
        let u = 0;
        while (Math.abs(n) >= 1024 && u < units.length - 1) {
            n /= 1024;
            u++;
        }
        return (u === 0 ? String(n) : n.toFixed(n >= 100 ? 0 : 1)) + ' ' + units[u];
    }

    /** Milliseconds as "123 ms" / "1.23 s". */
    function fmtMs(ms) {
        if (typeof ms !== 'number' || !Number.isFinite(ms)) return '–';
        return ms < 1000 ? ms.toFixed(ms < 10 ? 1 : 0) + ' ms' : (ms / 1000).toFixed(2) + ' s';
    }

    function fmtScore(s) {
        return typeof s === 'number' && Number.isFinite(s) ? s.toFixed(3) : '–';
    }

    /** The value of a number input: undefined when blank (the model's default applies). */
    function numberValue(id) {
        const v = $(id).value.trim();
        if (v === '') return undefined;
        const n = Number(v);
        return Number.isFinite(n) ? n : undefined;
    }

    /** Put v into an input, blank for undefined / null. */
    function setValue(id, v) {
        $(id).value = v === undefined || v === null ? '' : String(v);
    }

    function setStatus(id, text, bad) {
        const s = $(id);
        s.textContent = text || '';
        s.classList.toggle('bad', !!bad);
    }

    // ------------------------------------------------------------------ API calls and errors

    let apiKey = ''; // the API key: this variable only (no storage of any kind)

    /** An error of the API (status 0: the server could not be reached). */
    class ApiError extends Error {
        constructor(status, type, message) {
            super(message);
            this.status = status;
            this.type = type;
        }
    }

    /** The ApiError of a non-2xx response (its JSON error body, else its text). */
    async function errorOf(res) {
        let text = '';
        try {
            text = await res.text();
            const j = JSON.parse(text);
            if (j && j.error) {
                return new ApiError(j.error.code || res.status, j.error.type || 'error',
                    j.error.message || res.statusText);
            }
        } catch (e) {
            /* not JSON: fall through */
        }
        return new ApiError(res.status, 'http_error', text.trim() || res.statusText || 'HTTP ' + res.status);
    }

    /**
     * Call the API: GET path, or POST body as JSON. @return the Response (2xx).
     * @throws ApiError (a 401 also raises the page's API-key alert), or the
     *         AbortError of signal.
     */
    async function api(path, body, signal) {
        const headers = {};
        if (body !== undefined) headers['Content-Type'] = 'application/json';
        if (apiKey) headers.Authorization = 'Bearer ' + apiKey;
        let res;
        try {
            res = await fetch(path, {
                method: body === undefined ? 'GET' : 'POST',
                headers,
                body: body === undefined ? undefined : JSON.stringify(body),
                cache: 'no-store',
                signal,
            });
        } catch (e) {
            if (e.name === 'AbortError') throw e;
            throw new ApiError(0, 'network_error', 'Could not reach the server (' + e.message + ').');
        }
        if (res.ok) return res;
        const err = await errorOf(res);
        if (err.status === 401) showKeyAlert(err);
        return Promise.reject(err);
    }

    /** One line for an error: "message (type, HTTP 422)". */
    function describe(err) {
        if (!(err instanceof ApiError)) return String(err && err.message ? err.message : err);
        if (err.status === 0) return err.message;
        return err.message + ' (' + err.type + ', HTTP ' + err.status + ')';
    }

    /** An error box for a result area. */
    function errorBox(err) {
        const box = el('div', 'error');
        box.setAttribute('role', 'alert');
        const head = el('strong', null, err instanceof ApiError && err.status
            ? 'Error ' + err.status + ' ' : 'Error ');
        box.append(head);
        if (err instanceof ApiError && err.status) box.append(el('span', 'etype', err.type), ': ');
        box.append(el('span', null, err instanceof ApiError ? err.message : String(err.message || err)));
        if (err instanceof ApiError && err.status === 401) {
            box.append(el('p', null, apiKey
                ? 'The key was refused: check the “API key” field at the top and press “Use key”.'
                : 'This server needs an API key: type it into the “API key” field at the top and press “Use key”.'));
        }
        return box;
    }

    function showAlert(text) {
        const a = $('alert');
        a.textContent = text;
        a.hidden = false;
    }

    function hideAlert() {
        const a = $('alert');
        a.textContent = '';
        a.hidden = true;
    }

    function showKeyAlert(err) {
        showAlert(apiKey
            ? 'The server refused the API key (' + err.message + '). Check the “API key” field at the top and press “Use key”.'
            : 'This server needs an API key (' + err.message + '). Type it into the “API key” field at the top and press “Use key”.');
    }

    // ------------------------------------------------------------------ the API key field

    $('key-form').addEventListener('submit', (ev) => {
        ev.preventDefault(); // never submitted: the policy forbids form actions anyway
        const k = $('api-key').value.trim();
        // a key is printable ASCII without spaces (as the server's config requires);
        // anything else could not even be sent as a header
        if (k && !/^[\x21-\x7e]+$/.test(k)) {
            showAlert('An API key is printable ASCII without spaces; this one has other characters.');
            return;
        }
        apiKey = k;
        hideAlert();
        memoryBlocked = false;
        loadModels();
        pollMemory();
    });

    // ------------------------------------------------------------------ tabs (WAI-ARIA tabs pattern)

    const tabs = Array.from(document.querySelectorAll('[role="tab"]'));

    function selectTab(tab, focus) {
        for (const t of tabs) {
            const on = t === tab;
            t.setAttribute('aria-selected', on ? 'true' : 'false');
            t.tabIndex = on ? 0 : -1; // roving tabindex: Tab enters the list at the selected tab
            $(t.getAttribute('aria-controls')).hidden = !on;
        }
        if (focus) tab.focus();
    }

    for (const t of tabs) {
        t.addEventListener('click', () => selectTab(t, true));
        t.addEventListener('keydown', (ev) => {
            const i = tabs.indexOf(t);
            let next = null;
            if (ev.key === 'ArrowRight' || ev.key === 'ArrowDown') next = tabs[(i + 1) % tabs.length];
            else if (ev.key === 'ArrowLeft' || ev.key === 'ArrowUp') next = tabs[(i - 1 + tabs.length) % tabs.length];
            else if (ev.key === 'Home') next = tabs[0];
            else if (ev.key === 'End') next = tabs[tabs.length - 1];
            if (next) {
                ev.preventDefault();
                selectTab(next, true);
            }
        });
    }

    // ------------------------------------------------------------------ models

    let models = []; // /v1/models "models"
    let modelsRetry = null;

    const modelByName = (name) => models.find((m) => m.name === name);

    /** A one-line description of a model for the info line under its picker. */
    function modelInfo(m) {
        if (!m) return '';
        if (m.loaded === false) return 'still loading…';
        const parts = [];
        if (m.architecture) parts.push(m.architecture);
        if (m.parameters) parts.push((m.parameters / 1e6).toFixed(1) + ' M parameters');
        if (m.weight_mode) {
            let w = m.weight_mode + ' weights';
            if (m.ratio) w += ', stored at ' + (m.ratio * 100).toFixed(1) + ' % of the source';
            if (m.bits_per_weight) w += ' (' + m.bits_per_weight.toFixed(2) + ' bits/weight)';
            parts.push(w);
        }
        if (m.task === 'dialogue' && m.num_modes) parts.push(m.num_modes + ' decoders');
        return parts.join(' · ');
    }

    /** Fill a model picker with the models of one task, keeping its selection. */
    function fillPicker(select, task) {
        const keep = select.value;
        select.replaceChildren();
        const list = models.filter((m) => m.task === task);
        for (const m of list) {
            const o = el('option', null, m.name + (m.loaded === false ? ' (loading)' : ''));
            o.value = m.name;
            select.append(o);
        }
        if (!list.length) {
            const o = el('option', null, task === 'translate' ? 'no translation model' : 'no dialogue model');
            o.value = '';
            select.append(o);
        }
        if (list.some((m) => m.name === keep)) select.value = keep;
        select.disabled = !list.length;
        return select.value !== keep; // changed: the defaults must be filled in again
    }

    async function loadModels() {
        clearTimeout(modelsRetry);
        try {
            const j = await (await api('/v1/models')).json();
            models = Array.isArray(j.models) ? j.models : [];
        } catch (e) {
            for (const id of ['tr-model-info', 'chat-model-info']) $(id).textContent = 'Models unavailable: ' + describe(e);
            document.body.dataset.models = 'error';
            return;
        }
        if (fillPicker($('tr-model'), 'translate')) translateDefaults();
        if (fillPicker($('chat-model'), 'dialogue')) chatDefaults();
        $('tr-model-info').textContent = modelInfo(modelByName($('tr-model').value));
        $('chat-model-info').textContent = modelInfo(modelByName($('chat-model').value));
        document.body.dataset.models = 'loaded'; // (for the browser test)
        if (models.some((m) => m.loaded === false)) modelsRetry = setTimeout(loadModels, MODELS_RETRY_MS);
    }

    // ------------------------------------------------------------------ translate

    let candidatesUnsupported = false; // the server answered 422 to CANDIDATES_FIELD

    /** Fill the options with the selected translation model's "generation". */
    function translateDefaults() {
        const m = modelByName($('tr-model').value);
        const g = (m && m.generation) || {};
        const hasAt = !m || m.at_decoder !== false;
        // the AT decoder (and AT rerank) only where the model has one
        $('tr-decoder').querySelector('option[value="at"]').disabled = !hasAt;
        $('tr-rerank').querySelector('option[value="at"]').disabled = !hasAt;
        $('tr-decoder').value = g.decoder === 'at' && hasAt ? 'at' : 'nat';
        setValue('tr-beam', g.beam_size);
        setValue('tr-iterations', g.iterations);
        setValue('tr-length-beam', g.length_beam);
        $('tr-rerank').value = g.rerank === 'at' && hasAt ? 'at' : 'none';
        $('tr-adaptive').checked = !!g.adaptive;
        setValue('tr-max-length', g.max_length);
        translateFieldsets();
    }

    /** Enable the options of the chosen decoder only (the others would not apply). */
    function translateFieldsets() {
        const at = $('tr-decoder').value === 'at';
        $('tr-at').disabled = !at;
        $('tr-nat').disabled = at;
    }

    $('tr-model').addEventListener('change', () => {
        translateDefaults();
        $('tr-model-info').textContent = modelInfo(modelByName($('tr-model').value));
    });
    $('tr-decoder').addEventListener('change', translateFieldsets);
    $('tr-defaults').addEventListener('click', translateDefaults);

    /** The /v1/translate body from the form. */
    function translateBody(texts) {
        const b = { texts };
        if ($('tr-model').value) b.model = $('tr-model').value;
        const decoder = $('tr-decoder').value;
        b.decoder = decoder;
        const put = (field, v) => {
            if (v !== undefined) b[field] = v;
        };
        if (decoder === 'at') {
            put('beam_size', numberValue('tr-beam'));
        } else {
            put('iterations', numberValue('tr-iterations'));
            put('length_beam', numberValue('tr-length-beam'));
            b.rerank = $('tr-rerank').value;
            b.adaptive = $('tr-adaptive').checked;
            if ($('tr-candidates').checked && !candidatesUnsupported) b[CANDIDATES_FIELD] = true;
        }
        put('max_length', numberValue('tr-max-length'));
        if ($('tr-tokens').checked) b.return_tokens = true;
        return b;
    }

    /** Show a /v1/translate response (j) for texts, ms measured in the browser. */
    function showTranslations(texts, j, ms) {
        const out = $('tr-result');
        out.replaceChildren();
        const t = j.timing_ms || {};
        const u = j.usage || {};
        const timing = [texts.length + (texts.length === 1 ? ' text' : ' texts') + ' in ' + fmtMs(ms) + ' (browser)'];
        if (j.timing_ms) {
            timing.push('server: queue ' + fmtMs(t.queue) + ', inference ' + fmtMs(t.inference) + ', total ' + fmtMs(t.total));
        }
        if (j.usage) timing.push('tokens: ' + u.input_tokens + ' in, ' + u.output_tokens + ' out');
        if (j.model) timing.push('model ' + j.model);
        out.append(el('p', 'timing', timing.join(' · ')));

        const list = el('ol', 'tr-list');
        (j.translations || []).forEach((tr, i) => {
            const item = el('li', 'tr-item');
            item.append(el('p', 'tr-src', texts[i]));
            const o = el('p', 'tr-out', tr.text);
            o.lang = 'de';
            item.append(o);
            let meta = 'score ' + fmtScore(tr.score);
            if (Array.isArray(tr.tokens)) meta += ' · tokens ' + tr.tokens.join(' ');
            item.append(el('p', 'meta mono', meta));
            if (Array.isArray(tr.candidates) && tr.candidates.length) item.append(candidateList(tr));
            list.append(item);
        });
        out.append(list);
    }

    /** The length-beam candidates of one translation, as the server lists them. */
    function candidateList(tr) {
        const wrap = el('div');
        wrap.append(el('p', 'meta', 'Length-beam candidates:'));
        const ol = el('ol', 'cands');
        for (const c of tr.candidates) {
            const chosen = c.chosen === true || (c.chosen === undefined && c.text === tr.text);
            const li = el('li', chosen ? 'chosen' : null);
            li.append(el('span', null, c.text));
            const bits = [];
            if (c.length !== undefined) bits.push('length ' + c.length);
            if (c.score !== undefined) bits.push('score ' + fmtScore(c.score));
            if (chosen) bits.push('chosen');
            if (bits.length) li.append(el('span', 'meta', ' (' + bits.join(', ') + ')'));
            ol.append(li);
        }
        wrap.append(ol);
        return wrap;
    }

    $('tr-form').addEventListener('submit', async (ev) => {
        ev.preventDefault();
        const texts = $('tr-text').value.split('\n').map((s) => s.trim()).filter((s) => s);
        if (!texts.length) {
            setStatus('tr-status', 'Type at least one text (one per line).', true);
            return;
        }
        $('tr-go').disabled = true;
        setStatus('tr-status', 'Translating…');
        const t0 = performance.now();
        try {
            let j;
            try {
                j = await (await api('/v1/translate', translateBody(texts))).json();
            } catch (e) {
                // a server without the candidates field: say so once, ask again without it
                if (!(e instanceof ApiError && e.status === 422 && e.message.includes(CANDIDATES_FIELD))) throw e;
                candidatesUnsupported = true;
                $('tr-candidates').checked = false;
                $('tr-candidates').disabled = true;
                $('tr-candidates-note').textContent = 'This server does not report the length-beam candidates.';
                j = await (await api('/v1/translate', translateBody(texts))).json();
            }
            showTranslations(texts, j, performance.now() - t0);
            setStatus('tr-status', 'Done.');
        } catch (e) {
            $('tr-result').replaceChildren(errorBox(e));
            setStatus('tr-status', 'Failed: ' + describe(e), true);
        } finally {
            $('tr-go').disabled = false;
        }
    });

    // ------------------------------------------------------------------ server-sent events over fetch()

    /** One event block ("event: E\ndata: D" lines) → {event, data} (data parsed as JSON), or null. */
    function parseEvent(block) {
        let event = 'message';
        const data = [];
        for (const line of block.split('\n')) {
            if (!line || line[0] === ':') continue; // blank or comment
            const i = line.indexOf(':');
            const field = i < 0 ? line : line.slice(0, i);
            let value = i < 0 ? '' : line.slice(i + 1);
            if (value[0] === ' ') value = value.slice(1);
            if (field === 'event') event = value;
            else if (field === 'data') data.push(value);
        }
        if (!data.length) return null;
        return { event, data: JSON.parse(data.join('\n')) };
    }

    /** Read a text/event-stream response to its end, calling onEvent(name, data) per event. */
    async function readEvents(res, onEvent) {
        if (!res.body) { // no streaming body: parse it whole
            for (const b of (await res.text()).replace(/\r\n?/g, '\n').split('\n\n')) {
                const e = parseEvent(b);
                if (e) onEvent(e.event, e.data);
            }
            return;
        }
        const reader = res.body.getReader();
        const decoder = new TextDecoder();
        let buf = '';
        for (;;) {
            const { value, done } = await reader.read();
            buf += done ? decoder.decode() : decoder.decode(value, { stream: true });
            buf = buf.replace(/\r\n/g, '\n');
            let cut;
            while ((cut = buf.indexOf('\n\n')) >= 0) { // an empty line ends an event
                const e = parseEvent(buf.slice(0, cut));
                buf = buf.slice(cut + 2);
                if (e) onEvent(e.event, e.data);
            }
            if (done) break;
        }
        if (buf.trim()) {
            const e = parseEvent(buf);
            if (e) onEvent(e.event, e.data);
        }
    }

    // ------------------------------------------------------------------ chat

    const chat = {
        history: [], // turns, oldest first: {who: 'user' | 'bot', text, decoder?, rank?}
        cards: new Map(), // decoder index → its answer card (the last request's)
        result: null, // the last "done" response, until one of its answers is used
        abort: null, // AbortController of the request in flight
    };

    /** Fill the options with the selected dialogue model's "generation". */
    function chatDefaults() {
        const m = modelByName($('chat-model').value);
        const g = (m && m.generation) || {};
        $('chat-strategy').value = ['greedy', 'beam', 'sample'].includes(g.strategy) ? g.strategy : 'greedy';
        setValue('chat-beam', g.beam_size);
        setValue('chat-length-penalty', g.length_penalty);
        setValue('chat-temperature', g.temperature);
        setValue('chat-top-p', g.top_p);
        setValue('chat-top-k', g.top_k);
        setValue('chat-seed', g.seed);
        setValue('chat-max-new', g.max_new_tokens);
        setValue('chat-ngram', g.no_repeat_ngram_size);
        $('chat-distinct').checked = !!g.distinct;
        // one checkbox per decoder, all on
        const box = $('chat-decoders');
        box.querySelectorAll('.check').forEach((c) => c.remove());
        const k = (m && m.num_modes) || 0;
        for (let d = 0; d < k; d++) {
            const c = el('div', 'check');
            const input = el('input');
            input.type = 'checkbox';
            input.id = 'chat-decoder-' + d;
            input.value = String(d);
            input.checked = true;
            const label = el('label', null, 'decoder ' + d);
            label.htmlFor = input.id;
            c.append(input, label);
            box.append(c);
        }
        chatFieldsets();
    }

    /** Enable the options of the chosen strategy only (the server refuses the others). */
    function chatFieldsets() {
        const s = $('chat-strategy').value;
        $('chat-beam-opts').disabled = s !== 'beam';
        $('chat-sample-opts').disabled = s !== 'sample';
    }

    $('chat-model').addEventListener('change', () => {
        chatDefaults();
        $('chat-model-info').textContent = modelInfo(modelByName($('chat-model').value));
    });
    $('chat-strategy').addEventListener('change', chatFieldsets);
    $('chat-defaults').addEventListener('click', chatDefaults);

    /** The conversation so far, as a list of turns. */
    function renderLog() {
        const log = $('chat-log');
        log.replaceChildren();
        for (const t of chat.history) {
            const li = el('li', 'turn ' + t.who);
            li.append(el('span', 'who', t.who === 'user' ? 'You'
                : 'Bot (decoder ' + t.decoder + (t.rank ? ', rank ' + t.rank : '') + ')'));
            li.append(el('span', null, t.text));
            log.append(li);
        }
        $('chat-empty').hidden = chat.history.length > 0;
    }

    /** An answer card for one decoder: streamed text, then rank, score and a "use" button. */
    function makeCard(decoder) {
        const card = el('article', 'answer streaming');
        card.dataset.decoder = String(decoder);
        const h = el('h3');
        h.append(el('span', null, 'Decoder ' + decoder));
        const rank = el('span', 'rank', '…');
        h.append(rank);
        const text = el('p', 'answer-text');
        const meta = el('p', 'meta', 'writing…');
        const use = el('button', null, 'Use this answer');
        use.type = 'button';
        use.disabled = true;
        use.setAttribute('aria-label', 'Use this answer (decoder ' + decoder + ') as the next turn');
        card.append(h, text, meta, use);
        const c = { decoder, card, rank, text, meta, use, value: '', tokens: 0, response: null };
        use.addEventListener('click', () => useAnswer(c));
        return c;
    }

    /** Add an answer to the conversation (the next turn) and close the round. */
    function useAnswer(c) {
        if (!chat.result || !c.response) return;
        chat.history.push({ who: 'bot', text: c.response.text, decoder: c.decoder, rank: c.response.rank });
        chat.result = null;
        for (const x of chat.cards.values()) x.use.disabled = true;
        c.card.classList.add('used');
        c.use.textContent = 'Used';
        c.use.setAttribute('aria-label', 'Used (decoder ' + c.decoder + ')');
        renderLog();
        setStatus('chat-status', 'Decoder ' + c.decoder + '’s answer is the next turn.');
        $('chat-input').focus();
    }

    /** The top-ranked answer's card of the last round, if any. */
    function topCard() {
        for (const c of chat.cards.values()) if (c.response && c.response.rank === 1) return c;
        return null;
    }

    /** The decoders to ask: every checked one (all: the field is left out). */
    function chosenDecoders() {
        const boxes = Array.from($('chat-decoders').querySelectorAll('input[type="checkbox"]'));
        const on = boxes.filter((b) => b.checked).map((b) => Number(b.value));
        return { on, all: on.length === boxes.length };
    }

    /** The /v1/dialogue body from the options. */
    function dialogueBody(decoders) {
        const b = { context: chat.history.map((t) => t.text), stream: true };
        if ($('chat-model').value) b.model = $('chat-model').value;
        if (!decoders.all) b.decoders = decoders.on;
        const put = (field, v) => {
            if (v !== undefined) b[field] = v;
        };
        const strategy = $('chat-strategy').value;
        b.strategy = strategy;
        if (strategy === 'beam') {
            put('beam_size', numberValue('chat-beam'));
            put('length_penalty', numberValue('chat-length-penalty'));
        }
        if (strategy === 'sample') {
            put('temperature', numberValue('chat-temperature'));
            put('top_p', numberValue('chat-top-p'));
            put('top_k', numberValue('chat-top-k'));
            put('seed', numberValue('chat-seed'));
        }
        put('max_new_tokens', numberValue('chat-max-new'));
        put('no_repeat_ngram_size', numberValue('chat-ngram'));
        b.distinct = $('chat-distinct').checked;
        return b;
    }

    function setBusy(busy) {
        $('chat-send').disabled = busy;
        $('chat-stop').disabled = !busy;
        $('chat-answers').setAttribute('aria-busy', busy ? 'true' : 'false');
    }

    /** The final response: ranks, scores, the dropped duplicates, the "use" buttons. */
    function finishRound(j, ms) {
        const responses = Array.isArray(j.responses) ? j.responses : [];
        responses.forEach((r, i) => {
            const c = chat.cards.get(r.decoder);
            if (!c) return;
            c.response = { text: r.text, score: r.score, rank: i + 1 };
            c.value = r.text; // the final text is the server's (the same as the tokens, concatenated)
            c.text.textContent = r.text;
            c.rank.textContent = 'rank ' + (i + 1);
            c.card.dataset.rank = String(i + 1);
            c.card.classList.toggle('best', i === 0);
            const agree = typeof r.consensus === 'number' ? ' · consensus ' + r.consensus.toFixed(2) : '';
            c.meta.textContent = 'score ' + fmtScore(r.score) + agree + ' · ' + c.tokens + ' tokens';
            c.use.disabled = false;
        });
        for (const c of chat.cards.values()) {
            c.card.classList.remove('streaming');
            if (!c.response) { // the distinct filter dropped it
                c.card.classList.add('dropped');
                c.rank.textContent = 'dropped';
                c.meta.textContent = 'the same text as a higher-ranked answer';
            }
        }
        chat.result = j;
        const t = j.timing_ms || {};
        const u = j.usage || {};
        setStatus('chat-status', responses.length + ' answers in ' + fmtMs(ms) + ' (browser) · server inference ' +
            fmtMs(t.inference) + ', queue ' + fmtMs(t.queue) + ' · ' + (u.output_tokens ?? '–') +
            ' tokens out. Pick one to use, or just go on with the top-ranked one.');
    }

    async function sendChat(ev) {
        ev.preventDefault();
        if (chat.abort) return; // one round at a time
        const msg = $('chat-input').value.trim();
        if (!msg) {
            setStatus('chat-status', 'Type a message first.', true);
            return;
        }
        const decoders = chosenDecoders();
        if (!decoders.on.length) {
            setStatus('chat-status', 'Pick at least one decoder (Decoding options).', true);
            return;
        }
        // the last round's answer nobody picked: the top-ranked one continues the conversation
        if (chat.result) {
            const top = topCard();
            if (top) useAnswer(top);
            chat.result = null;
        }
        chat.history.push({ who: 'user', text: msg });
        renderLog();
        $('chat-input').value = '';

        // one card per decoder asked, side by side, in decoder order
        const answers = $('chat-answers');
        chat.cards = new Map(decoders.on.map((d) => [d, makeCard(d)]));
        answers.replaceChildren(...Array.from(chat.cards.values(), (c) => c.card));
        answers.dataset.state = 'streaming'; // (for the browser test)
        setBusy(true);
        setStatus('chat-status', 'Waiting for the first token…');

        const ctrl = new AbortController();
        chat.abort = ctrl;
        const t0 = performance.now();
        let tokens = 0;
        let final = false;
        try {
            const res = await api('/v1/dialogue', dialogueBody(decoders), ctrl.signal);
            const type = res.headers.get('Content-Type') || '';
            if (!type.startsWith('text/event-stream')) { // not streamed after all: the whole response
                finishRound(await res.json(), performance.now() - t0);
                final = true;
            } else {
                await readEvents(res, (name, data) => {
                    if (name === 'token') {
                        const c = chat.cards.get(data.decoder);
                        if (!c) return;
                        c.value += data.text || '';
                        c.tokens++;
                        c.text.textContent = c.value;
                        c.meta.textContent = c.tokens + (c.tokens === 1 ? ' token' : ' tokens');
                        tokens++;
                        setStatus('chat-status', 'Streaming… ' + tokens + ' tokens');
                    } else if (name === 'done') {
                        final = true;
                        finishRound(data, performance.now() - t0);
                    } else if (name === 'error') {
                        final = true;
                        const e = data && data.error ? data.error : {};
                        throw new ApiError(e.code || 500, e.type || 'error', e.message || 'the stream failed');
                    }
                });
            }
            if (!final) throw new ApiError(0, 'stream_ended', 'The stream ended before its final event.');
            answers.dataset.state = 'done';
        } catch (e) {
            // no answer: the message goes back into the box, the turn out of the conversation
            chat.history.pop();
            renderLog();
            $('chat-input').value = msg;
            for (const c of chat.cards.values()) c.card.classList.remove('streaming');
            answers.dataset.state = 'error';
            if (e.name === 'AbortError') {
                setStatus('chat-status', 'Stopped.');
            } else {
                answers.append(errorBox(e));
                setStatus('chat-status', 'Failed: ' + describe(e), true);
            }
        } finally {
            chat.abort = null;
            setBusy(false);
        }
    }

    $('chat-form').addEventListener('submit', sendChat);
    $('chat-stop').addEventListener('click', () => {
        if (chat.abort) chat.abort.abort(); // closing the connection cancels the job on the server
    });
    $('chat-new').addEventListener('click', () => {
        if (chat.abort) chat.abort.abort();
        chat.history = [];
        chat.result = null;
        chat.cards = new Map();
        $('chat-answers').replaceChildren();
        delete $('chat-answers').dataset.state;
        renderLog();
        setStatus('chat-status', 'New conversation.');
        $('chat-input').focus();
    });
    // Enter sends, Shift+Enter is a new line (not while an input method composes)
    $('chat-input').addEventListener('keydown', (ev) => {
        if (ev.key === 'Enter' && !ev.shiftKey && !ev.isComposing) {
            ev.preventDefault();
            $('chat-form').requestSubmit();
        }
    });

    // ------------------------------------------------------------------ memory panel

    // /v1/memory categories, in display order, with their labels
    const MEMORY_ROWS = [
        ['mapped', 'weights (.nzp, mapped)'],
        ['weights', 'weights (heap)'],
        ['tile_cache', 'decoded tile cache'],
        ['kv_cache', 'KV cache'],
        ['activations', 'activations'],
        ['scratch', 'scratch'],
        ['other', 'other'],
    ];

    let memoryBlocked = false; // 401: wait for a key
    let memoryBusy = false;

    function memoryRow(label, bytes, max, title) {
        const tr = el('tr');
        const th = el('th', null, label);
        th.scope = 'row';
        const num = el('td', 'num', fmtBytes(bytes));
        if (title) num.title = title;
        const barCell = el('td', 'barcell');
        const bar = el('span', 'bar');
        bar.setAttribute('aria-hidden', 'true');
        const fill = el('span');
        // CSSOM from this script, not an inline style attribute: the policy allows it
        fill.style.width = (max > 0 ? Math.min(100, (100 * bytes) / max) : 0).toFixed(1) + '%';
        bar.append(fill);
        barCell.append(bar);
        tr.append(th, num, barCell);
        return tr;
    }

    function renderMemory(j) {
        const cats = j.categories || {};
        const rows = MEMORY_ROWS.filter(([k]) => cats[k]).map(([k, label]) => [label, cats[k].current_bytes, cats[k].peak_bytes]);
        const max = Math.max(j.rss_bytes || 0, ...rows.map((r) => r[1] || 0));
        const body = $('mem-body');
        body.replaceChildren();
        if (j.rss_bytes !== undefined) {
            body.append(memoryRow('process RSS', j.rss_bytes, max, 'peak ' + fmtBytes(j.rss_peak_bytes)));
        }
        for (const [label, now, peak] of rows) body.append(memoryRow(label, now, max, 'peak ' + fmtBytes(peak)));
        $('mem-table').hidden = false;

        const dl = $('mem-models');
        dl.replaceChildren();
        for (const m of j.models || []) {
            dl.append(el('dt', null, m.name));
            let s = fmtBytes(m.compressed_bytes) + ' compressed, ' + fmtBytes(m.decoded_equivalent_bytes) + ' decoded';
            if (m.decoded_over_compressed) s += ' (' + m.decoded_over_compressed.toFixed(2) + '×)';
            dl.append(el('dd', null, s));
        }
        const tc = j.tile_cache;
        if (tc) {
            dl.append(el('dt', null, 'tile cache'));
            const looks = (tc.hits || 0) + (tc.misses || 0);
            let s = fmtBytes(tc.bytes) + ' of ' + fmtBytes(tc.budget_bytes) + ', ' + (tc.entries || 0) + ' tiles';
            s += looks ? ', hit ratio ' + ((100 * tc.hits) / looks).toFixed(1) + ' %' : ', no lookups yet';
            dl.append(el('dd', null, s));
        }
        $('mem-status').textContent = 'Updated ' + new Date().toLocaleTimeString() + '; every ' + MEMORY_POLL_MS / 1000 + ' s.';
    }

    async function pollMemory() {
        if (document.hidden || memoryBlocked || memoryBusy) return;
        memoryBusy = true;
        try {
            renderMemory(await (await api('/v1/memory')).json());
        } catch (e) {
            if (e instanceof ApiError && e.status === 401) memoryBlocked = true; // until a key is given
            $('mem-status').textContent = 'Unavailable: ' + describe(e);
        } finally {
            memoryBusy = false;
        }
    }

    setInterval(pollMemory, MEMORY_POLL_MS);
    document.addEventListener('visibilitychange', pollMemory); // at once when the page shows again

    // ------------------------------------------------------------------ start

    translateFieldsets();
    chatFieldsets();
    renderLog();
    loadModels();
    pollMemory();
})();
