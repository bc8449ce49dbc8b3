// jssocket web console. Plain script, no framework, nothing loaded from elsewhere: its
// connection is jssocket-client's browser bundle (/console/jssocket-client.js, loaded first).
//
// The page is a client of this server's own WebSocket (/ws?labels=1): it sends client_connect,
// can subscribe to channels, and lists every frame that arrives, each notify labelled by the
// event that sent it (labels=1 asks the server to wrap notify_* payloads in an envelope naming
// it). The admin panel sends publish, notify_* and disconnect through the HTTP API with the
// admin password, which lives only in the password field (never stored, never put in a URL),
// and shows the server's state (GET /api/info, /metrics) and its users and connections
// (POST /api/users, /api/connections, paged), from which a target is picked for the forms.
//
// Payloads are shown and sent as their raw JSON text (checked with JSON.parse, never
// re-serialized), so key order and big numbers are exactly what the server relays.
'use strict';

(function () {
  const CHANNEL = /^[A-Za-z0-9._:\/-]{1,200}$/;
  const CHANNEL_RULE = 'A channel name is 1 to 200 characters of A-Z a-z 0-9 . _ - : /';
  const MAX_MESSAGES = 1000;
  const MAX_BACKOFF_MS = 15000;
  const OVERVIEW_EVERY_MS = 5000;

  const $ = (id) => document.getElementById(id);

  const state = {
    // The acknowledgement of the current connection (the client keeps the connection itself).
    id: null,
    roles: null,
    groups: null,
    ackNote: null,
    messages: [], // { element, search }
    seq: 0,
    // The admin views: the next page's cursor of each list (null: no more), what the
    // connections list is filtered by, the last /metrics sample (for messages/s).
    usersNext: null,
    usersPrefix: '',
    connectionsNext: null,
    connectionsUser: '',
    sample: null,
    overviewTimer: null,
    picked: null, // { kind: 'user' | 'target', value }
  };

  // ---------- raw JSON helpers ----------

  function skipWs(s, i) {
    while (i < s.length && (s[i] === ' ' || s[i] === '\n' || s[i] === '\r' || s[i] === '\t')) i++;
    return i;
  }

  function skipString(s, i) {
    i++;
    while (i < s.length && s[i] !== '"') i += s[i] === '\\' ? 2 : 1;
    return i + 1;
  }

  function skipValue(s, i) {
    i = skipWs(s, i);
    const c = s[i];
    if (c === '"') return skipString(s, i);
    if (c === '{' || c === '[') {
      let depth = 0;
      while (i < s.length) {
        const d = s[i];
        if (d === '"') { i = skipString(s, i); continue; }
        if (d === '{' || d === '[') depth++;
        else if (d === '}' || d === ']') { depth--; if (depth === 0) return i + 1; }
        i++;
      }
      return i;
    }
    while (i < s.length && !' \n\r\t,}]'.includes(s[i])) i++;
    return i;
  }

  // The raw text of member `key` of the JSON object text `s` (the last one, as JSON.parse).
  function member(s, key) {
    if (s === undefined) return undefined;
    let i = skipWs(s, 0);
    if (s[i] !== '{') return undefined;
    i++;
    let found;
    while (i < s.length) {
      i = skipWs(s, i);
      if (s[i] === '}') break;
      if (s[i] === ',') { i++; continue; }
      const start = i;
      i = skipString(s, i);
      const name = JSON.parse(s.slice(start, i));
      i = skipWs(s, i) + 1; // the ':'
      const valueStart = skipWs(s, i);
      i = skipValue(s, valueStart);
      if (name === key) found = s.slice(valueStart, i);
    }
    return found;
  }

  // Re-indents valid JSON text without parsing its values.
  function pretty(raw) {
    let out = '';
    let indent = 0;
    let i = 0;
    const newline = () => '\n' + '  '.repeat(indent);
    while (i < raw.length) {
      const c = raw[i];
      if (c === '"') {
        const end = skipString(raw, i);
        out += raw.slice(i, end);
        i = end;
      } else if (c === ' ' || c === '\n' || c === '\r' || c === '\t') {
        i++;
      } else if (c === '{' || c === '[') {
        const next = skipWs(raw, i + 1);
        if (raw[next] === (c === '{' ? '}' : ']')) {
          out += c + raw[next];
          i = next + 1;
        } else {
          indent++;
          out += c + newline();
          i++;
        }
      } else if (c === '}' || c === ']') {
        indent--;
        out += newline() + c;
        i++;
      } else if (c === ',') {
        out += ',' + newline();
        i++;
      } else if (c === ':') {
        out += ': ';
        i++;
      } else {
        let j = i;
        while (j < raw.length && !' \n\r\t,:{}[]"'.includes(raw[j])) j++;
        out += raw.slice(i, j);
        i = j;
      }
    }
    return out;
  }

  // ---------- connection panel ----------
  //
  // The connection is jssocket-client's (clients/js, served beside this file as
  // /console/jssocket-client.js): it registers, reconnects with backoff, subscribes again after
  // a reconnect, and tells the relay's answers from notify payloads. This page shows what it
  // reports.

  function socketUrl() {
    const scheme = location.protocol === 'https:' ? 'wss:' : 'ws:';
    return scheme + '//' + location.host + '/ws';
  }

  // Asked at every connect: the token field as it is then.
  const client = new jssocket.JssocketClient(socketUrl(), {
    token: () => $('token').value,
    minDelay: 1000,
    maxDelay: MAX_BACKOFF_MS,
  });

  function setText(id, text, dataState) {
    const el = $(id);
    el.textContent = text;
    if (dataState !== undefined) el.dataset.state = dataState;
  }

  function renderConnection() {
    const open = client.state === 'open';
    if (!open) {
      setText('registered', 'no: not connected', 'no');
    } else if (client.registered) {
      setText('registered', 'yes: client_connect sent', 'yes');
    } else {
      setText('registered', 'no: client_connect not sent yet', 'no');
    }
    if (client.acknowledged) {
      setText('acknowledged', 'yes: client_connected received', 'yes');
      setText('connection-id', state.id || '(the answer named no target)');
    } else if (open && client.registered) {
      setText('acknowledged', 'not yet: no backend has answered', 'waiting');
      setText('connection-id', 'not acknowledged yet');
    } else {
      setText('acknowledged', 'no', 'no');
      setText('connection-id', 'not acknowledged yet');
    }
    setText('roles', listText(state.roles));
    setText('groups', listText(state.groups));
    const note = $('ack-note');
    if (state.ackNote) {
      note.textContent = state.ackNote;
      note.dataset.state = 'error';
    } else {
      note.textContent = note.dataset.default;
      delete note.dataset.state;
    }
  }

  function listText(value) {
    if (!Array.isArray(value)) return '–';
    return value.length ? value.join(', ') : '(none)';
  }

  function setStatus(text, stateName) {
    setText('socket-status', text, stateName);
  }

  // Forgets what belonged to the old connection (its id, its acknowledgement); the client
  // keeps the subscriptions and sends them again when the next connection opens.
  function resetSession() {
    state.id = null;
    state.roles = null;
    state.groups = null;
    state.ackNote = null;
    renderConnection();
    renderSubscriptions();
  }

  function watchClient() {
    client.on('connecting', () => {
      $('ws-url').textContent = client.url;
      setStatus('Connecting…', 'connecting');
      resetSession();
    });
    client.on('open', () => {
      setStatus('Connected', 'open');
      renderConnection();
      renderSubscriptions();
    });
    client.on('closed', (event) => {
      const why = 'Disconnected (' + event.code + (event.reason ? ' ' + event.reason : '') + ')';
      setStatus(why + (event.reconnect ?
        ': reconnecting in ' + (event.delay / 1000).toFixed(1) + ' s' :
        ': not reconnecting (press Reconnect)'), 'closed');
      resetSession();
    });
    client.on('acknowledged', (event) => {
      state.id = event.target;
      state.roles = event.roles;
      state.groups = event.groups;
      state.ackNote = null;
      renderConnection();
    });
    client.on('subscribed', renderSubscriptions);
    client.on('unsubscribed', renderSubscriptions);
    client.on('error', (error) => {
      if (error.event === 'subscribe' || error.event === 'unsubscribe') {
        renderSubscriptions();
        if (error.channel !== undefined) {
          showError($('channel'), (error.event === 'subscribe' ? 'Could not subscribe to ' :
            'Could not unsubscribe from ') + error.channel + ': ' + error.message);
        }
      } else if (error.event === 'client_connect') {
        state.ackNote = 'The server answered client_connect with ' + error.code + ': ' + error.message;
        renderConnection();
      }
    });
    client.on('message', receive);
  }

  function sendClientConnect() {
    state.ackNote = null;
    client.register().then(renderConnection);
  }

  // ---------- subscriptions ----------

  // The client's subscription states, as this page names them.
  const SUBSCRIPTION_STATES = { pending: 'pending', subscribed: 'active', unsubscribed: 'leaving' };

  function renderSubscriptions() {
    const list = $('subscriptions');
    // Re-rendering replaces the buttons: keep keyboard focus on the same channel's button.
    const focused = list.contains(document.activeElement) ?
      document.activeElement.closest('li').dataset.channel : null;
    list.replaceChildren();
    for (const [name, sub] of client.subscriptions) {
      const s = SUBSCRIPTION_STATES[sub.state];
      const item = document.createElement('li');
      item.dataset.channel = name;
      item.dataset.state = s;
      const label = document.createElement('span');
      label.className = 'channel mono';
      label.textContent = name;
      const badge = document.createElement('span');
      badge.className = 'state';
      badge.textContent = s === 'active' ? 'subscribed' : s === 'leaving' ? 'leaving…' : 'pending…';
      const button = document.createElement('button');
      button.type = 'button';
      button.className = 'secondary small';
      button.textContent = 'Unsubscribe';
      button.setAttribute('aria-label', 'Unsubscribe from ' + name);
      button.addEventListener('click', () => unsubscribe(name));
      item.append(label, badge, button);
      list.append(item);
      if (name === focused) button.focus();
    }
    $('no-subscriptions').hidden = client.subscriptions.size > 0;
  }

  function subscribe(event) {
    event.preventDefault();
    const input = $('channel');
    const name = input.value.trim();
    clearError(input);
    if (!CHANNEL.test(name)) {
      showError(input, name ? CHANNEL_RULE + '.' : 'Enter a channel name, e.g. foo.bar.');
      return;
    }
    const existing = client.subscriptions.get(name);
    if (existing && existing.state !== 'unsubscribed') {
      showError(input, 'Already subscribed to ' + name + '.');
      return;
    }
    client.subscribe(name);
    input.value = '';
    renderSubscriptions();
  }

  function unsubscribe(name) {
    client.unsubscribe(name);
    renderSubscriptions();
    $('channel').focus();
  }

  // ---------- messages ----------

  // Every frame the client received, with the kind it took it for: the relay's envelopes
  // (labelled notifies included: the client asks for labels=1), a bare payload from a relay
  // that does not label ('notify'), or text that is not JSON.
  function receive(message) {
    const text = message.raw;
    if (message.type === 'text') {
      addMessage('text', null, text, false);
      return;
    }
    if (message.type === 'notify') {
      addMessage('notify', null, text, true);
      return;
    }
    const rawData = member(text, 'data');
    if (message.type === 'publish') {
      const data = message.data;
      const name = data && typeof data.name === 'string' ? data.name : '?';
      addMessage('publish', name, member(rawData, 'data') || 'null', true);
      return;
    }
    addMessage(message.type, null, rawData === undefined ? 'null' : rawData, true);
  }

  function two(n) { return String(n).padStart(2, '0'); }

  function clock(date) {
    return two(date.getHours()) + ':' + two(date.getMinutes()) + ':' + two(date.getSeconds()) +
      '.' + String(date.getMilliseconds()).padStart(3, '0');
  }

  function addMessage(kind, channel, raw, isJson) {
    const now = new Date();
    const body = isJson ? pretty(raw) : raw;
    const item = document.createElement('li');
    item.className = 'message';
    item.dataset.kind = kind;
    item.dataset.seq = String(++state.seq);
    if (channel !== null) item.dataset.channel = channel;

    const head = document.createElement('div');
    head.className = 'message-head';
    const time = document.createElement('time');
    time.dateTime = now.toISOString();
    time.textContent = clock(now);
    const badge = document.createElement('span');
    badge.className = 'kind';
    badge.textContent = kind;
    head.append(time, badge);
    if (channel !== null) {
      const name = document.createElement('span');
      name.className = 'channel mono';
      name.textContent = channel;
      head.append(name);
    }
    const pre = document.createElement('pre');
    pre.className = 'payload';
    pre.textContent = body;
    item.append(head, pre);

    const entry = { element: item, search: (kind + ' ' + (channel || '') + ' ' + body).toLowerCase() };
    state.messages.push(entry);
    item.hidden = !matches(entry, filterText());
    $('messages').prepend(item);
    while (state.messages.length > MAX_MESSAGES) state.messages.shift().element.remove();
    renderCount();
  }

  function filterText() {
    return $('message-filter').value.trim().toLowerCase();
  }

  function matches(entry, filter) {
    return !filter || entry.search.includes(filter);
  }

  function applyFilter() {
    const filter = filterText();
    for (const entry of state.messages) entry.element.hidden = !matches(entry, filter);
    renderCount();
  }

  function renderCount() {
    const total = state.messages.length;
    const shown = state.messages.filter((m) => !m.element.hidden).length;
    $('message-count').textContent = total === 0 ? '' :
      shown === total ? '(' + total + ')' : '(' + shown + ' of ' + total + ' shown)';
    const empty = $('no-messages');
    empty.hidden = shown > 0;
    empty.textContent = total === 0 ?
      'No messages yet. Subscribe to a channel, then publish to it.' :
      'No message matches the filter.';
  }

  function clearMessages() {
    for (const entry of state.messages) entry.element.remove();
    state.messages = [];
    renderCount();
  }

  // ---------- field errors ----------

  function showError(field, message) {
    const error = $(field.id + '-error');
    error.textContent = message;
    error.hidden = false;
    field.setAttribute('aria-invalid', 'true');
  }

  function clearError(field) {
    const error = $(field.id + '-error');
    if (error) {
      error.textContent = '';
      error.hidden = true;
    }
    field.removeAttribute('aria-invalid');
  }

  // Checks a payload box: returns its raw JSON text, or null after showing why not.
  function payloadOf(field) {
    const raw = field.value.trim();
    if (!raw) {
      showError(field, 'The payload is empty: enter JSON, for example {} or "text". Nothing was sent.');
      return null;
    }
    try {
      JSON.parse(raw);
    } catch (e) {
      showError(field, 'Not valid JSON (' + e.message + '). Nothing was sent.');
      return null;
    }
    return raw;
  }

  function commaList(field) {
    return field.value.split(',').map((s) => s.trim()).filter((s) => s.length > 0);
  }

  // ---------- admin panel ----------

  // Builds the request body of an admin form: { body } or { invalid: [fields] }.
  function buildBody(form) {
    const invalid = [];
    const check = (ok, field) => { if (!ok) invalid.push(field); };
    switch (form.dataset.event) {
      case 'publish': {
        const nameField = $('publish-name');
        const name = nameField.value.trim();
        if (!CHANNEL.test(name)) {
          showError(nameField, name ? CHANNEL_RULE + '.' : 'Enter the channel to publish to.');
          invalid.push(nameField);
        }
        const payloadField = $('publish-payload');
        const payload = payloadOf(payloadField);
        check(payload !== null, payloadField);
        const filters = ['roles', 'groups', 'users']
          .map((key) => [key, commaList($('publish-' + key))])
          .filter(([, list]) => list.length > 0);
        if (filters.length > 1) {
          const fieldset = form.querySelector('.filters');
          $('publish-filter-error').textContent =
            'Fill at most one filter: the server takes one of roles, groups or users.';
          $('publish-filter-error').hidden = false;
          invalid.push($('publish-' + filters[0][0]));
          fieldset.dataset.invalid = 'true';
        }
        if (invalid.length) return { invalid: invalid };
        let body = '{"name":' + JSON.stringify(name) + ',"data":' + payload;
        for (const [key, list] of filters) body += ',' + JSON.stringify(key) + ':' + JSON.stringify(list);
        return { body: body + '}' };
      }
      case 'notify_client': {
        const targetField = $('notify-client-target');
        const target = targetField.value.trim();
        if (!target) {
          showError(targetField, 'Enter the connection id to notify.');
          invalid.push(targetField);
        }
        const payloadField = $('notify-client-payload');
        const payload = payloadOf(payloadField);
        check(payload !== null, payloadField);
        if (invalid.length) return { invalid: invalid };
        return { body: '{"target":' + JSON.stringify(target) + ',"data":' + payload + '}' };
      }
      case 'notify_group': {
        const target = $('notify-group-target').value.trim();
        const payloadField = $('notify-group-payload');
        const payload = payloadOf(payloadField);
        if (payload === null) return { invalid: [payloadField] };
        const targetPart = target ? '"target":' + JSON.stringify(target) + ',' : '';
        return { body: '{' + targetPart + '"data":' + payload + '}' };
      }
      case 'disconnect': {
        const whoField = $('disconnect-who');
        const who = whoField.value.trim();
        const kind = $('disconnect-kind-user').checked ? 'user' : 'target';
        if (!who) {
          showError(whoField, kind === 'user' ? 'Enter the user to disconnect.' : 'Enter the connection id to close.');
          invalid.push(whoField);
        }
        const codeField = $('disconnect-code');
        const codeText = codeField.value.trim();
        const code = Number(codeText);
        if (codeText && !(Number.isInteger(code) && code >= 4000 && code <= 4999)) {
          showError(codeField, 'A close code is a whole number from 4000 to 4999 (empty: 4000).');
          invalid.push(codeField);
        }
        if (invalid.length) return { invalid: invalid };
        let body = '{' + JSON.stringify(kind) + ':' + JSON.stringify(who);
        if (codeText) body += ',"code":' + code;
        const reason = $('disconnect-reason').value;
        if (reason) body += ',"reason":' + JSON.stringify(reason);
        return { body: body + '}' };
      }
      default: {
        const payloadField = $('notify-all-payload');
        const payload = payloadOf(payloadField);
        if (payload === null) return { invalid: [payloadField] };
        return { body: payload };
      }
    }
  }

  function resetFormErrors(form) {
    for (const field of form.querySelectorAll('input, textarea')) clearError(field);
    const filterError = $('publish-filter-error');
    if (form.contains(filterError)) {
      filterError.hidden = true;
      delete form.querySelector('.filters').dataset.invalid;
    }
  }

  function showResult(form, text, kind) {
    const output = form.querySelector('output');
    output.textContent = text;
    output.dataset.state = kind;
  }

  async function submitAdmin(event) {
    event.preventDefault();
    const form = event.currentTarget;
    const event_ = form.dataset.event;
    resetFormErrors(form);
    clearError($('password'));
    showResult(form, '', 'idle');
    const built = buildBody(form);
    const password = $('password').value;
    if (!built.invalid && !password) {
      showError($('password'), 'Enter the admin password first. Nothing was sent.');
      built.invalid = [$('password')];
    }
    if (built.invalid) {
      showResult(form, 'Not sent: fix the marked field.', 'error');
      built.invalid[0].focus();
      return;
    }
    const button = form.querySelector('button[type=submit]');
    button.disabled = true;
    showResult(form, 'Sending…', 'pending');
    try {
      const response = await fetch('/api/' + event_, {
        method: 'POST',
        headers: { 'Content-Type': 'application/json', 'Authorization': 'Bearer ' + password },
        body: built.body,
        cache: 'no-store',
        credentials: 'omit',
        redirect: 'error',
      });
      const text = await response.text();
      let answer = null;
      try { answer = JSON.parse(text); } catch (e) { /* a plain-text answer */ }
      if (response.ok && answer && typeof answer.delivered === 'number') {
        const n = answer.delivered;
        showResult(form, 'Delivered to ' + n + (n === 1 ? ' connection' : ' connections') +
          ' (HTTP ' + response.status + ')', 'ok');
      } else if (response.ok && answer && typeof answer.closed === 'number') {
        // disconnect: {"closed":C,"nodes":K,"timeout"?:[node ids that did not confirm]}
        const n = answer.closed;
        const late = Array.isArray(answer.timeout) && answer.timeout.length ?
          '; no answer in time from ' + answer.timeout.join(', ') : '';
        showResult(form, 'Closed ' + n + (n === 1 ? ' connection' : ' connections') +
          ' on ' + answer.nodes + (answer.nodes === 1 ? ' node' : ' nodes') + late +
          ' (HTTP ' + response.status + ')', late ? 'error' : 'ok');
      } else if (answer && answer.error) {
        showResult(form, 'HTTP ' + response.status + ' ' + answer.error.code + ': ' + answer.error.message, 'error');
      } else {
        showResult(form, 'HTTP ' + response.status + ': ' + text.trim(), response.ok ? 'ok' : 'error');
      }
    } catch (e) {
      showResult(form, 'Not sent: ' + e.message, 'error');
    } finally {
      button.disabled = false;
    }
  }

  // ---------- admin views: overview, users, connections, picking a target ----------

  // An admin request to the HTTP API: GET without a body, else POST. Returns
  // { ok, status, answer (parsed JSON or null), text }; throws on a network failure.
  async function adminRequest(path, body) {
    const password = $('password').value;
    const init = {
      method: body === undefined ? 'GET' : 'POST',
      headers: { 'Authorization': 'Bearer ' + password },
      cache: 'no-store',
      credentials: 'omit',
      redirect: 'error',
    };
    if (body !== undefined) {
      init.headers['Content-Type'] = 'application/json';
      init.body = JSON.stringify(body);
    }
    const response = await fetch(path, init);
    const text = await response.text();
    let answer = null;
    try { answer = JSON.parse(text); } catch (e) { /* plain text (metrics, an error) */ }
    return { ok: response.ok, status: response.status, answer: answer, text: text };
  }

  function failureText(reply) {
    const error = reply.answer && reply.answer.error;
    return 'HTTP ' + reply.status + (error ? ' ' + error.code + ': ' + error.message : ': ' + reply.text.trim());
  }

  function needPassword(output) {
    if ($('password').value) return false;
    output.textContent = 'Enter the admin password first (Admin panel).';
    output.dataset.state = 'error';
    return true;
  }

  // Sums the samples of a metric in Prometheus text (every label set).
  function metricSum(text, name) {
    let sum = 0;
    let found = false;
    for (const line of text.split('\n')) {
      if (!line.startsWith(name)) continue;
      const rest = line.slice(name.length);
      if (rest[0] !== ' ' && rest[0] !== '{') continue;
      const value = Number(line.slice(line.lastIndexOf(' ') + 1));
      if (Number.isFinite(value)) { sum += value; found = true; }
    }
    return found ? sum : null;
  }

  function duration(seconds) {
    const d = Math.floor(seconds / 86400);
    const h = Math.floor(seconds / 3600) % 24;
    const m = Math.floor(seconds / 60) % 60;
    const s = Math.floor(seconds) % 60;
    if (d > 0) return d + ' d ' + h + ' h';
    if (h > 0) return h + ' h ' + m + ' min';
    if (m > 0) return m + ' min ' + s + ' s';
    return s + ' s';
  }

  function rate(n) {
    return n < 10 ? n.toFixed(1) : String(Math.round(n));
  }

  async function refreshOverview() {
    clearTimeout(state.overviewTimer);
    state.overviewTimer = null;
    const note = $('overview-note');
    if (needPassword(note)) return;
    let ok = false;
    try {
      const [info, metrics] = await Promise.all([adminRequest('/api/info'), adminRequest('/metrics')]);
      if (!info.ok || !info.answer) {
        note.textContent = 'GET /api/info: ' + failureText(info);
        note.dataset.state = 'error';
      } else {
        renderInfo(info.answer);
        if (metrics.ok) renderMetrics(metrics.text);
        note.textContent = 'Updated ' + clock(new Date()) + '. Counts: the whole cluster (GET /api/info); ' +
          'uptime and messages/s: this node (/metrics).';
        note.dataset.state = 'ok';
        ok = true;
      }
    } catch (e) {
      note.textContent = 'Could not ask the server: ' + e.message;
      note.dataset.state = 'error';
    }
    if (ok && $('overview-auto').checked) {
      state.overviewTimer = setTimeout(refreshOverview, OVERVIEW_EVERY_MS);
    }
  }

  function renderInfo(info) {
    const nodes = Array.isArray(info.nodes) ? info.nodes : [];
    const late = nodes.filter((n) => n.timeout).length;
    setText('stat-connections', String(info.connections));
    setText('stat-users', String(info.users));
    setText('stat-channels', String(info.channels));
    setText('stat-groups', String(info.groups));
    setText('stat-nodes', nodes.length + (late ? ' (' + late + ' not answering)' : ''));
    const versions = [...new Set(nodes.filter((n) => n.version).map((n) => n.version))];
    setText('stat-version', versions.join(', ') || '–');
    const list = $('node-list');
    list.replaceChildren();
    if (nodes.length < 2 && !late) return;
    for (const node of nodes) {
      const item = document.createElement('li');
      item.className = 'mono';
      item.dataset.state = node.timeout ? 'timeout' : 'ok';
      item.textContent = node.id + ': ' + (node.timeout ? 'did not answer in time' :
        node.connections + ' connections, ' + node.version);
      list.append(item);
    }
  }

  function renderMetrics(text) {
    const uptime = metricSum(text, 'jssocket_uptime_seconds');
    if (uptime !== null) setText('stat-uptime', duration(uptime));
    const received = metricSum(text, 'jssocket_messages_received_total');
    const sent = metricSum(text, 'jssocket_messages_sent_total');
    if (received === null || sent === null) return;
    const now = performance.now();
    const last = state.sample;
    state.sample = { at: now, received: received, sent: sent };
    if (!last || now - last.at < 500) {
      setText('stat-rate', '…'); // a rate needs a second sample (the next refresh)
      return;
    }
    const seconds = (now - last.at) / 1000;
    setText('stat-rate', 'in ' + rate(Math.max(0, received - last.received) / seconds) +
      ' · out ' + rate(Math.max(0, sent - last.sent) / seconds));
  }

  function listButton(text, label, onClick) {
    const button = document.createElement('button');
    button.type = 'button';
    button.className = 'secondary small';
    button.textContent = text;
    button.setAttribute('aria-label', label);
    button.addEventListener('click', onClick);
    return button;
  }

  // Entries asked for per page of users or connections (the server allows 1 to 1000).
  function pageSize() {
    const n = Number($('page-size').value);
    return Number.isInteger(n) && n >= 1 && n <= 1000 ? n : 50;
  }

  // One page of users (the first when `reset`), appended to the list.
  async function loadUsers(reset) {
    const output = $('users-result');
    if (needPassword(output)) return;
    if (reset) {
      state.usersPrefix = $('users-prefix').value.trim();
      state.usersNext = null;
    }
    const body = { limit: pageSize() };
    if (state.usersPrefix) body.prefix = state.usersPrefix;
    if (!reset && state.usersNext) body.cursor = state.usersNext;
    output.textContent = 'Asking…';
    output.dataset.state = 'pending';
    let reply;
    try {
      reply = await adminRequest('/api/users', body);
    } catch (e) {
      output.textContent = 'Not sent: ' + e.message;
      output.dataset.state = 'error';
      return;
    }
    if (!reply.ok || !reply.answer || !Array.isArray(reply.answer.users)) {
      output.textContent = failureText(reply);
      output.dataset.state = 'error';
      return;
    }
    const list = $('user-list');
    if (reset) list.replaceChildren();
    for (const entry of reply.answer.users) {
      const item = document.createElement('li');
      item.dataset.user = entry.user;
      const name = document.createElement('span');
      name.className = 'name mono';
      name.textContent = entry.user;
      const count = document.createElement('span');
      count.className = 'count';
      count.textContent = entry.connections + (entry.connections === 1 ? ' connection' : ' connections');
      item.append(name, count,
        listButton('Connections', 'List the connections of ' + entry.user, () => {
          $('connections-user').value = entry.user;
          loadConnections(true);
        }),
        listButton('Pick', 'Pick user ' + entry.user + ' as the target', () => pick('user', entry.user)));
      list.append(item);
    }
    state.usersNext = typeof reply.answer.next === 'string' ? reply.answer.next : null;
    $('users-more').hidden = state.usersNext === null;
    const shown = list.children.length;
    output.textContent = shown === 0 ? 'No user is connected' + (state.usersPrefix ? ' with that prefix.' : '.') :
      shown + (shown === 1 ? ' user' : ' users') + (state.usersNext ? ' so far' : '');
    output.dataset.state = 'ok';
  }

  async function loadConnections(reset) {
    const output = $('connections-result');
    if (needPassword(output)) return;
    if (reset) {
      state.connectionsUser = $('connections-user').value.trim();
      state.connectionsNext = null;
    }
    const body = { limit: pageSize() };
    if (state.connectionsUser) body.user = state.connectionsUser;
    if (!reset && state.connectionsNext) body.cursor = state.connectionsNext;
    output.textContent = 'Asking…';
    output.dataset.state = 'pending';
    let reply;
    try {
      reply = await adminRequest('/api/connections', body);
    } catch (e) {
      output.textContent = 'Not sent: ' + e.message;
      output.dataset.state = 'error';
      return;
    }
    if (!reply.ok || !reply.answer || !Array.isArray(reply.answer.connections)) {
      output.textContent = failureText(reply);
      output.dataset.state = 'error';
      return;
    }
    const list = $('connection-list');
    if (reset) list.replaceChildren();
    for (const c of reply.answer.connections) {
      const item = document.createElement('li');
      item.dataset.target = c.target;
      const id = document.createElement('span');
      id.className = 'name mono';
      id.textContent = c.target;
      id.title = c.target;
      const about = document.createElement('span');
      about.className = 'count';
      const parts = [c.user ? 'user ' + c.user : 'no user'];
      if (Array.isArray(c.roles) && c.roles.length) parts.push('roles ' + c.roles.join(', '));
      if (Array.isArray(c.groups) && c.groups.length) parts.push('groups ' + c.groups.join(', '));
      if (Array.isArray(c.subscriptions) && c.subscriptions.length) parts.push(c.subscriptions.length + ' subscriptions');
      if (c.target === state.id) parts.push('this page');
      about.textContent = parts.join(' · ');
      item.append(id, about,
        listButton('Pick', 'Pick connection ' + c.target + ' as the target', () => pick('target', c.target)));
      list.append(item);
    }
    state.connectionsNext = typeof reply.answer.next === 'string' ? reply.answer.next : null;
    $('connections-more').hidden = state.connectionsNext === null;
    const shown = list.children.length;
    output.textContent = shown === 0 ? 'No connection.' :
      shown + (shown === 1 ? ' connection' : ' connections') + (state.connectionsNext ? ' so far' : '');
    output.dataset.state = 'ok';
  }

  // Fills the forms' targets with a picked user (its group is named after it: notify_group;
  // the publish users filter; disconnect every connection of it) or connection (notify_client,
  // notify_group of its group, disconnect that connection).
  function pick(kind, value) {
    state.picked = { kind: kind, value: value };
    const filled = [];
    if (kind === 'user') {
      for (const key of ['roles', 'groups']) $('publish-' + key).value = '';
      $('publish-users').value = value;
      filled.push('publish (users filter)');
    } else {
      $('notify-client-target').value = value;
      clearError($('notify-client-target'));
      filled.push('notify_client');
    }
    $('notify-group-target').value = value;
    filled.push('notify_group');
    $('disconnect-kind-' + kind).checked = true;
    $('disconnect-who').value = value;
    clearError($('disconnect-who'));
    filled.push('disconnect');
    const picked = $('picked');
    picked.textContent = 'Picked ' + (kind === 'user' ? 'user ' : 'connection ') + value +
      ': filled into ' + filled.join(', ') + '.';
    picked.hidden = false;
    for (const item of document.querySelectorAll('.directory li')) {
      const mine = kind === 'user' ? item.dataset.user === value : item.dataset.target === value;
      if (mine) item.dataset.picked = 'true'; else delete item.dataset.picked;
    }
  }

  // ---------- wiring ----------

  function init() {
    const note = $('ack-note');
    note.dataset.default = note.textContent.replace(/\s+/g, ' ').trim();

    $('connect-form').addEventListener('submit', (event) => {
      event.preventDefault();
      if (client.state === 'open') sendClientConnect();
      else client.connect();
    });
    $('reconnect').addEventListener('click', () => client.connect());
    $('subscribe-form').addEventListener('submit', subscribe);
    $('channel').addEventListener('input', () => clearError($('channel')));
    $('forget-password').addEventListener('click', () => {
      $('password').value = '';
      $('password').focus();
    });
    $('password').addEventListener('input', () => clearError($('password')));
    for (const form of document.querySelectorAll('form.admin-form')) {
      form.addEventListener('submit', submitAdmin);
      for (const field of form.querySelectorAll('input, textarea')) {
        field.addEventListener('input', () => clearError(field));
      }
      for (const area of form.querySelectorAll('textarea')) {
        area.addEventListener('keydown', (event) => {
          if (event.key === 'Enter' && (event.ctrlKey || event.metaKey)) {
            event.preventDefault();
            form.requestSubmit();
          }
        });
      }
    }
    $('overview-refresh').addEventListener('click', refreshOverview);
    $('overview-auto').addEventListener('change', () => {
      if ($('overview-auto').checked) refreshOverview();
      else { clearTimeout(state.overviewTimer); state.overviewTimer = null; }
    });
    // (no automatic refresh on typing the password: a half-typed or wrong one would cost
    // bcrypt runs and auth failures; Refresh asks)
    $('users-form').addEventListener('submit', (event) => { event.preventDefault(); loadUsers(true); });
    $('users-more').addEventListener('click', () => loadUsers(false));
    $('connections-form').addEventListener('submit', (event) => { event.preventDefault(); loadConnections(true); });
    $('connections-more').addEventListener('click', () => loadConnections(false));
    $('message-filter').addEventListener('input', applyFilter);
    $('clear-messages').addEventListener('click', clearMessages);
    watchClient();
    renderSubscriptions();
    renderCount();
    client.connect();
  }

  init();
})();
