// firstline call page: talk to the server from a browser.
//
// One websocket per call on the native protocol (docs/protocol.md): the
// microphone goes up as 16 kHz pcm16 in 20 ms binary frames (an AudioWorklet,
// capture-worklet.js, does the capture and downsampling), and with
// `options.reply_audio` the spoken reply comes back as binary pcm16 frames,
// scheduled back to back on the Web Audio clock. Each `response.audio.mark`
// is echoed as `response.audio.played` only once its audio has really
// played, so the server's history holds what the caller heard; a
// `response.audio.clear` (barge-in) stops every scheduled source at once.
//
// `turn.metrics` and `turn.audio_metrics` become a waterfall per turn.
// Everything the page knows is mirrored on `window.firstline` (plain data),
// which the browser test (tests/test_demo_page.py) reads.
//
// Standard APIs only (Chromium, Firefox, Safari); no modules, no build step.

(() => {
  'use strict';

  const CAPTURE_RATE = 16000; // what the server's ASR runs at: no resampling there
  const FRAME_SAMPLES = 320; // 20 ms at 16 kHz
  const START_LEAD_S = 0.04; // first buffer of a burst starts this far ahead: never clipped
  const LOW_WATER_S = 0.12; // less than this queued: schedule each frame at once
  const COALESCE_MS = 60; // otherwise batch frames into fewer, longer buffers
  // Speech captured between the click and `ready` (socket, start, the
  // server's reply; the first call after start-up also loads the voice) is
  // held, not lost: people talk as soon as they click.
  const MAX_EARLY_FRAMES = 500; // 10 s, 320 KB

  // ---- state shared with the UI and with tests ------------------------

  const stats = {
    state: 'idle', // idle | connecting | live | ending | ended | failed
    callId: null,
    replyAudio: null, // the `ready` event's reply_audio format, or null (text only)
    audio: {
      framesReceived: 0,
      framesScheduled: 0,
      secondsScheduled: 0,
      secondsPlayed: 0,
      marksReceived: 0,
      marksPlayed: 0,
      clears: 0,
      underruns: 0, // a buffer had to start late: the reply stalled mid-sentence
      peak: 0, // loudest reply sample scheduled (0..1): real audio, not silence
      active: 0, // sources scheduled and not yet finished
      playingUntil: 0, // performance.now() (ms) at which the scheduled audio runs out
      lastClear: null, // {turn, stopped, droppedS, activeAfter}
      clearLog: [], // every clear of this page session, oldest first (bounded)
    },
    mic: { frames: 0, framesSent: 0, level: 0, sampleRate: null, muted: false },
    calls: 0, // calls started from this page
    turns: {}, // this call's turns: turn -> {partial, final, sentences[], heard[], done, cancelled, bargeIn, metrics, audioMetrics}
    ttfs: [], // ms per answered turn, every call of this page session
    ttfa: [],
    history: [], // {call, turn, ttfs, ttfa} per answered turn, this page session
    events: {}, // count per server event type
    errors: [], // error events and failures, newest last
  };
  window.firstline = stats;

  const $ = (id) => document.getElementById(id);
  const ui = {
    call: $('call'),
    mute: $('mute'),
    token: $('token'),
    systemPrompt: $('system-prompt'),
    endpoint: $('endpoint'),
    status: $('status'),
    notice: $('notice'),
    micLevel: $('mic-level'),
    hearing: $('hearing'),
    playing: $('playing'),
    turns: $('turns'),
    empty: $('empty'),
    waterfalls: $('waterfalls'),
    wfEmpty: $('wf-empty'),
    ttfsP50: $('ttfs-p50'),
    ttfsP95: $('ttfs-p95'),
    ttfaP50: $('ttfa-p50'),
    ttfaP95: $('ttfa-p95'),
    turnCount: $('turn-count'),
    bargeIns: $('barge-ins'),
    played: $('played'),
    history: $('history'),
  };

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function setState(state) {
    stats.state = state;
    ui.status.textContent = state;
    ui.status.className = `status ${state}`;
    const inCall = state === 'connecting' || state === 'live' || state === 'ending';
    ui.call.textContent = inCall ? 'Hang up' : 'Start call';
    ui.call.classList.toggle('hangup', inCall);
    ui.call.disabled = state === 'ending';
    ui.mute.disabled = !inCall;
    if (!inCall) setMuted(false);
    ui.token.disabled = inCall;
    ui.systemPrompt.disabled = inCall;
    ui.endpoint.disabled = inCall;
  }

  // Mute the way call apps do: the track stays open and sends silence, so the
  // server hears a quiet caller (and can end the turn), not a dead line.
  function setMuted(muted) {
    stats.mic.muted = muted;
    ui.mute.setAttribute('aria-pressed', String(muted));
    ui.mute.textContent = muted ? 'Unmute' : 'Mute';
    if (call && call.stream) for (const track of call.stream.getAudioTracks()) track.enabled = !muted;
  }

  function notice(text, kind = 'info') {
    ui.notice.textContent = text;
    ui.notice.className = `notice ${kind}`;
    ui.notice.hidden = !text;
    if (kind === 'error') stats.errors.push(text);
  }

  // ---- reply audio: gapless scheduling on the Web Audio clock ---------

  class Player {
    constructor(ctx, sampleRate, onMarkPlayed) {
      this.ctx = ctx;
      this.rate = sampleRate;
      this.onMarkPlayed = onMarkPlayed;
      this.out = ctx.createGain();
      this.out.connect(ctx.destination);
      this.sources = new Set(); // {src, start, duration, marks[], stopped}
      this.last = null;
      this.nextTime = 0; // where the next buffer starts: the end of everything scheduled
      this.pending = []; // Int16Array frames not yet in a buffer
      this.pendingSamples = 0;
      this.timer = 0;
    }

    frame(data) {
      stats.audio.framesReceived++;
      const pcm = new Int16Array(data);
      this.pending.push(pcm);
      this.pendingSamples += pcm.length;
      // Frames arrive in bursts (a sentence is synthesized, then sent at
      // once). When little is queued, play at once (latency); when plenty
      // is, batch into longer buffers (fewer nodes, no clicks at seams).
      if (this.nextTime - this.ctx.currentTime < LOW_WATER_S) this.flush();
      else if (!this.timer) this.timer = setTimeout(() => this.flush(), COALESCE_MS);
    }

    flush() {
      if (this.timer) {
        clearTimeout(this.timer);
        this.timer = 0;
      }
      if (this.pendingSamples === 0) return;
      const buffer = this.ctx.createBuffer(1, this.pendingSamples, this.rate);
      const channel = buffer.getChannelData(0);
      let offset = 0;
      let peak = stats.audio.peak;
      for (const pcm of this.pending) {
        for (let i = 0; i < pcm.length; i++) {
          const v = pcm[i] / 32768;
          channel[offset++] = v;
          if (v > peak) peak = v;
          else if (-v > peak) peak = -v;
        }
      }
      stats.audio.peak = peak;
      stats.audio.framesScheduled += this.pending.length;
      this.pending = [];
      this.pendingSamples = 0;

      const src = this.ctx.createBufferSource();
      src.buffer = buffer;
      src.connect(this.out);
      const now = this.ctx.currentTime;
      if (this.sources.size > 0 && this.nextTime < now) stats.audio.underruns++;
      // Back to back with what is queued; after a gap, a little ahead of now.
      const start = Math.max(this.nextTime, now + START_LEAD_S);
      const entry = { src, start, duration: buffer.duration, marks: [], stopped: false };
      src.onended = () => this.ended(entry);
      src.start(start);
      this.nextTime = start + buffer.duration;
      this.sources.add(entry);
      this.last = entry;
      stats.audio.secondsScheduled += buffer.duration;
      this.changed();
    }

    // All of a sentence's frames came before its mark (one ordered socket):
    // the mark plays when the buffer holding its last frame has ended.
    mark(name) {
      stats.audio.marksReceived++;
      this.flush();
      if (this.last !== null && this.sources.has(this.last)) this.last.marks.push(name);
      else this.onMarkPlayed(name); // its audio has already played out
    }

    ended(entry) {
      if (!this.sources.delete(entry) || entry.stopped) return;
      stats.audio.secondsPlayed += entry.duration;
      for (const name of entry.marks) this.onMarkPlayed(name);
      this.changed();
    }

    // Barge-in: silence now. Marks of stopped buffers are never echoed, so
    // the server keeps only the sentences that really played.
    clear() {
      if (this.timer) {
        clearTimeout(this.timer);
        this.timer = 0;
      }
      const now = this.ctx.currentTime;
      const droppedS = Math.max(0, this.nextTime - now) + this.pendingSamples / this.rate;
      let stopped = 0;
      for (const entry of this.sources) {
        entry.stopped = true;
        stats.audio.secondsPlayed += Math.min(entry.duration, Math.max(0, now - entry.start));
        try {
          entry.src.stop();
        } catch (err) {
          // never started: nothing to stop
        }
        entry.src.disconnect();
        stopped++;
      }
      this.sources.clear();
      this.last = null;
      this.pending = [];
      this.pendingSamples = 0;
      this.nextTime = 0;
      this.changed();
      return { stopped, droppedS };
    }

    changed() {
      stats.audio.active = this.sources.size;
      const ahead = this.sources.size > 0 ? Math.max(0, this.nextTime - this.ctx.currentTime) : 0;
      stats.audio.playingUntil = performance.now() + 1000 * ahead;
      ui.playing.classList.toggle('on', this.sources.size > 0);
    }
  }

  // ---- the call --------------------------------------------------------

  let call = null; // {ws, ctx, stream, source, node, player, ended}

  async function startCall() {
    if (!window.isSecureContext || !navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
      notice(
        `The microphone needs a secure page: open it as http://localhost:PORT/ or http://127.0.0.1:PORT/, ` +
          `or put the server behind https (this page is ${location.origin}).`,
        'error',
      );
      setState('failed');
      return;
    }
    if (typeof AudioWorkletNode === 'undefined') {
      notice('This browser has no AudioWorklet: use a current Chromium, Firefox or Safari.', 'error');
      setState('failed');
      return;
    }
    notice('');
    setState('connecting');
    // A new call: a fresh conversation and waterfall (turn numbers restart);
    // the session's percentiles and history keep counting.
    stats.calls++;
    stats.turns = {};
    ui.turns.replaceChildren();
    ui.waterfalls.replaceChildren();
    ui.empty.hidden = false;
    ui.wfEmpty.hidden = false;
    // Created inside the click handler: browsers start audio only after a gesture.
    const current = {
      ws: null,
      ctx: new AudioContext({ latencyHint: 'interactive' }),
      stream: null,
      source: null,
      node: null,
      player: null,
      ended: false,
      opened: false,
      early: [], // mic frames before `ready`
    };
    call = current;
    try {
      await current.ctx.resume();
      current.stream = await navigator.mediaDevices.getUserMedia({
        audio: { echoCancellation: true, noiseSuppression: true, autoGainControl: true, channelCount: 1 },
      });
      await current.ctx.audioWorklet.addModule('demo/capture-worklet.js');
    } catch (err) {
      teardown(current);
      // Hung up while the permission prompt was open (or another call began):
      // this call's failure is not the page's state any more.
      if (call !== current || current.ended) return;
      const denied = err && (err.name === 'NotAllowedError' || err.name === 'SecurityError');
      notice(denied ? 'Microphone access was refused.' : `Could not start the microphone: ${err}`, 'error');
      setState('failed');
      return;
    }
    if (call !== current || current.ended) {
      teardown(current); // hung up while the permission prompt was open
      return;
    }
    for (const track of current.stream.getAudioTracks()) track.enabled = !stats.mic.muted;
    try {
      current.source = current.ctx.createMediaStreamSource(current.stream);
    } catch (err) {
      // Older Firefox cannot feed a microphone into a context at another
      // rate: run the call at the microphone's rate instead (the worklet
      // downsamples from whatever it gets; playback resamples anyway).
      const rate = current.stream.getAudioTracks()[0].getSettings().sampleRate;
      if (!(err && err.name === 'NotSupportedError' && rate)) throw err;
      current.ctx.close().catch(() => {});
      current.ctx = new AudioContext({ latencyHint: 'interactive', sampleRate: rate });
      await current.ctx.resume();
      await current.ctx.audioWorklet.addModule('demo/capture-worklet.js');
      current.source = current.ctx.createMediaStreamSource(current.stream);
    }
    const ctx = current.ctx;
    stats.mic.sampleRate = ctx.sampleRate;
    current.node = new AudioWorkletNode(ctx, 'firstline-capture', {
      numberOfInputs: 1,
      numberOfOutputs: 1, // an output wired to a muted gain: some engines only run pulled nodes
      outputChannelCount: [1],
      processorOptions: { targetRate: CAPTURE_RATE, frameSamples: FRAME_SAMPLES },
    });
    current.node.port.onmessage = (e) => onMicFrame(current, e.data);
    const mute = ctx.createGain();
    mute.gain.value = 0;
    current.source.connect(current.node);
    current.node.connect(mute).connect(ctx.destination);
    connect(current);
  }

  // Characters a subprotocol may hold (an HTTP token).
  const SUBPROTOCOL_SAFE = /^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$/;

  function callTarget() {
    // Relative to the page, as its files are: a path prefix is kept.
    const address = new URL('v1/call', location.href);
    address.protocol = location.protocol === 'https:' ? 'wss:' : 'ws:';
    const url = address.href;
    const token = ui.token.value.trim();
    // Browsers cannot set an Authorization header on a websocket. The token
    // rides as a subprotocol, never in the URL (proxies and CDNs log URLs);
    // one a subprotocol cannot hold as it is ('/', '=', spaces: a base64
    // token) goes base64url-encoded. The server takes both
    // (voice/server/app.py _token_of) and echoes "firstline".
    if (!token) return { url, protocols: [] };
    if (SUBPROTOCOL_SAFE.test(token)) return { url, protocols: ['firstline', `firstline-token.${token}`] };
    return { url, protocols: ['firstline', `firstline-token-b64.${base64url(token)}`] };
  }

  function base64url(text) {
    const bytes = new TextEncoder().encode(text);
    let binary = '';
    for (const b of bytes) binary += String.fromCharCode(b);
    return btoa(binary).replace(/\+/g, '-').replace(/\//g, '_').replace(/=+$/, '');
  }

  function connect(current) {
    const target = callTarget();
    const ws = new WebSocket(target.url, target.protocols);
    ws.binaryType = 'arraybuffer';
    current.ws = ws;
    ws.onopen = () => {
      current.opened = true;
      const start = {
        type: 'start',
        version: 1,
        audio: { encoding: 'pcm16', sample_rate: CAPTURE_RATE },
        metadata: { client: 'firstline-demo-page', user_agent: navigator.userAgent.slice(0, 200) },
        options: { reply_audio: true, partials: true },
      };
      const prompt = ui.systemPrompt.value.trim();
      if (prompt) start.system_prompt = prompt;
      const endpoint = Number(ui.endpoint.value);
      if (endpoint > 0) start.options.endpoint_silence_ms = endpoint; // a fixed window instead of the adaptive one
      ws.send(JSON.stringify(start));
    };
    ws.onmessage = (e) => {
      if (call !== current) return;
      if (typeof e.data === 'string') onEvent(current, JSON.parse(e.data));
      else if (current.player !== null) current.player.frame(e.data);
    };
    ws.onerror = () => {}; // onclose follows with what little the browser tells
    ws.onclose = (e) => onClosed(current, e);
  }

  let meterShownAt = 0;

  function onMicFrame(current, { pcm, level }) {
    stats.mic.frames++;
    stats.mic.level = level;
    const now = performance.now();
    if (now - meterShownAt > 80) {
      // ~12 updates a second are plenty for an eye, and 50 restyles a second
      // would cost CPU that the server on the same laptop wants.
      meterShownAt = now;
      ui.micLevel.style.width = `${Math.min(100, Math.sqrt(level) * 180).toFixed(1)}%`;
    }
    // Audio before `ready` would be refused (not_started): hold it until then.
    if (stats.state === 'live' && current.ws && current.ws.readyState === WebSocket.OPEN) {
      current.ws.send(pcm);
      stats.mic.framesSent++;
    } else if (stats.state === 'connecting') {
      current.early.push(pcm);
      if (current.early.length > MAX_EARLY_FRAMES) current.early.shift();
    }
  }

  function hangUp() {
    const current = call;
    if (current === null) return;
    if (current.player) current.player.clear(); // the caller wants silence now, not the rest of the sentence
    if (current.ws && current.ws.readyState === WebSocket.OPEN && stats.state === 'live') {
      setState('ending');
      current.ws.send(JSON.stringify({ type: 'stop' }));
      // The server answers call.ended and closes; don't wait on it forever.
      setTimeout(() => {
        if (current.ws.readyState !== WebSocket.CLOSED) current.ws.close(1000, 'hang up');
      }, 3000);
    } else {
      current.ended = true;
      if (current.ws) current.ws.close(1000, 'hang up');
      teardown(current);
      setState('ended');
    }
  }

  async function onClosed(current, e) {
    if (call !== current) return;
    const wasLive = stats.state === 'live' || stats.state === 'ending';
    const endedCleanly = current.ended;
    teardown(current);
    setState(endedCleanly || stats.state === 'ending' ? 'ended' : 'failed');
    if (endedCleanly || stats.state === 'ended') return;
    if (!current.opened) {
      // The upgrade was refused; browsers hide the HTTP status, so ask /readyz.
      let why = 'wrong or missing token, the server is at capacity, or this page\'s address is not allowed '
        + '(behind a proxy: --public-url or --allow-origin)';
      try {
        const ready = await (await fetch('readyz', { cache: 'no-store' })).json();
        if (ready.draining) why = 'the server is shutting down';
        else if (!ready.ready) why = 'the server is still warming up; try again in a few seconds';
      } catch (err) {
        why = 'the server is not reachable';
      }
      notice(`The call was refused: ${why}.`, 'error');
    } else {
      const how = wasLive ? 'dropped' : 'ended before it started';
      notice(`The call ${how} (close code ${e.code}${e.reason ? `: ${e.reason}` : ''}).`, 'error');
    }
  }

  function teardown(current) {
    current.ended = true;
    current.early = [];
    if (current.player) current.player.clear();
    if (current.node) {
      current.node.port.onmessage = null;
      current.node.disconnect();
    }
    if (current.source) current.source.disconnect();
    if (current.stream) for (const track of current.stream.getTracks()) track.stop();
    if (current.ctx.state !== 'closed') current.ctx.close().catch(() => {});
    ui.micLevel.style.width = '0%';
    ui.hearing.classList.remove('on');
    ui.playing.classList.remove('on');
    if (call === current) call = null;
  }

  // ---- server events ---------------------------------------------------

  let hearingTimer = 0;

  function hearing() {
    ui.hearing.classList.add('on');
    clearTimeout(hearingTimer);
    hearingTimer = setTimeout(() => ui.hearing.classList.remove('on'), 1500);
  }

  function onEvent(current, ev) {
    stats.events[ev.type] = (stats.events[ev.type] || 0) + 1;
    switch (ev.type) {
      case 'ready':
        stats.callId = ev.call_id;
        stats.replyAudio = ev.reply_audio;
        if (ev.reply_audio && ev.reply_audio.encoding === 'pcm16') {
          current.player = new Player(current.ctx, ev.reply_audio.sample_rate, (name) => markPlayed(current, name));
        } else {
          notice('Text only: the server has no voice loaded (install firstline[tts]); replies are shown, not spoken.');
        }
        setState('live');
        for (const pcm of current.early) current.ws.send(pcm); // in order, before any newer frame
        stats.mic.framesSent += current.early.length;
        current.early = [];
        break;
      case 'speech.started':
        hearing();
        break;
      case 'transcript.partial': {
        hearing();
        const turn = turnOf(ev.turn);
        if (!turn.final) {
          turn.partial = ev.text;
          renderTurn(ev.turn);
        }
        break;
      }
      case 'transcript.final': {
        const turn = turnOf(ev.turn);
        turn.final = ev.text;
        turn.audioEndMs = ev.audio_end_ms;
        renderTurn(ev.turn);
        break;
      }
      case 'response.sentence': {
        const turn = turnOf(ev.turn);
        turn.sentences[ev.index] = ev.text;
        renderTurn(ev.turn);
        break;
      }
      case 'response.done': {
        const turn = turnOf(ev.turn);
        turn.done = true;
        turn.cancelled = Boolean(ev.cancelled);
        renderTurn(ev.turn);
        break;
      }
      case 'turn.metrics': {
        const turn = turnOf(ev.turn);
        turn.metrics = ev;
        if (typeof ev.ttfs_ms === 'number') {
          stats.ttfs.push(ev.ttfs_ms);
          // turn.audio_metrics may come first (the first audio went out before the reply ended).
          const ttfa = turn.audioMetrics ? turn.audioMetrics.ttfa_ms : null;
          stats.history.push({ call: stats.calls, turn: ev.turn, ttfs: ev.ttfs_ms, ttfa });
        }
        renderWaterfall(ev.turn);
        renderStats();
        break;
      }
      case 'turn.audio_metrics': {
        const turn = turnOf(ev.turn);
        turn.audioMetrics = ev;
        if (typeof ev.ttfa_ms === 'number') {
          stats.ttfa.push(ev.ttfa_ms);
          const row = stats.history.find((h) => h.call === stats.calls && h.turn === ev.turn);
          if (row) row.ttfa = ev.ttfa_ms;
        }
        renderWaterfall(ev.turn);
        renderStats();
        break;
      }
      case 'response.audio.mark': {
        const turn = turnOf(ev.turn);
        turn.marks[ev.name] = ev.index;
        if (current.player) current.player.mark(ev.name);
        break;
      }
      case 'response.audio.clear': {
        stats.audio.clears++;
        const result = current.player ? current.player.clear() : { stopped: 0, droppedS: 0 };
        stats.audio.lastClear = {
          turn: ev.turn,
          stopped: result.stopped,
          droppedS: result.droppedS,
          activeAfter: current.player ? current.player.sources.size : 0,
        };
        stats.audio.clearLog.push(stats.audio.lastClear);
        if (stats.audio.clearLog.length > 50) stats.audio.clearLog.shift();
        if (typeof ev.turn === 'number') {
          turnOf(ev.turn).bargeIn = true;
          renderTurn(ev.turn);
          renderWaterfall(ev.turn); // its badge: the metrics may have come before the clear
        }
        renderStats();
        break;
      }
      case 'error':
        notice(`Server error ${ev.code}: ${ev.message}`, 'error');
        break;
      case 'call.ended':
        current.ended = true;
        if (ev.reason !== 'client_stop') notice(`The server ended the call: ${ev.reason}.`);
        break;
      default:
        break; // response.delta, turn.ended: the sentences say it better
    }
  }

  function markPlayed(current, name) {
    stats.audio.marksPlayed++;
    // Tells the server the caller heard this sentence to its end (barge-in
    // history keeps exactly what was heard).
    if (current.ws && current.ws.readyState === WebSocket.OPEN) {
      current.ws.send(JSON.stringify({ type: 'response.audio.played', name }));
    }
    for (const [key, turn] of Object.entries(stats.turns)) {
      if (name in turn.marks) {
        turn.heard[turn.marks[name]] = true;
        renderTurn(Number(key));
      }
    }
    renderStats();
  }

  // ---- conversation ----------------------------------------------------

  function turnOf(n) {
    if (!(n in stats.turns)) {
      stats.turns[n] = {
        partial: '',
        final: null,
        audioEndMs: null, // where the turn's last word ended in the call's audio
        sentences: [],
        heard: [],
        marks: {},
        done: false,
        cancelled: false,
        bargeIn: false,
        metrics: null,
        audioMetrics: null,
      };
    }
    return stats.turns[n];
  }

  function turnItem(n) {
    let item = ui.turns.querySelector(`li[data-turn="${n}"]`);
    if (item === null) {
      ui.empty.hidden = true;
      item = el('li', 'turn');
      item.dataset.turn = String(n);
      const you = el('div', 'line you');
      you.append(el('span', 'who', 'You'), el('span', 'text'));
      const bot = el('div', 'line bot');
      bot.append(el('span', 'who', 'firstline'), el('span', 'text'));
      item.append(el('span', 'turn-no', `#${n}`), you, bot);
      ui.turns.append(item);
    }
    return item;
  }

  function renderTurn(n) {
    const turn = stats.turns[n];
    // Follow the conversation inside its own box (never scroll the page),
    // unless the reader has scrolled up to look at something.
    const box = ui.turns.parentElement;
    const stick = box.scrollHeight - box.scrollTop - box.clientHeight < 40;
    const item = turnItem(n);
    const you = item.querySelector('.you .text');
    you.textContent = turn.final !== null ? turn.final : turn.partial;
    you.classList.toggle('partial', turn.final === null);
    const youLine = item.querySelector('.you');
    youLine.dataset.final = turn.final !== null ? 'true' : 'false';
    youLine.hidden = !you.textContent; // a greeting: the server spoke first

    const bot = item.querySelector('.bot');
    const text = bot.querySelector('.text');
    text.replaceChildren();
    turn.sentences.forEach((sentence, i) => {
      if (sentence === undefined) return;
      const span = el('span', 'sentence', sentence);
      span.dataset.index = String(i);
      if (turn.heard[i]) span.classList.add('heard');
      else if (turn.bargeIn) span.classList.add('unheard'); // cut off: the caller never heard it
      text.append(span, ' ');
    });
    if (turn.bargeIn) text.append(el('span', 'flag', 'barge-in: playback stopped'));
    else if (turn.cancelled) text.append(el('span', 'flag', 'interrupted'));
    bot.hidden = turn.sentences.length === 0 && !turn.done;
    if (stick) box.scrollTop = box.scrollHeight;
  }

  // ---- waterfall -------------------------------------------------------

  // Each stage is a bar from when its work began to when it ended, in ms
  // after the caller's last voiced sample. With preemptive generation, ASR
  // and the first token often finish *before* the endpoint: the bars overlap
  // to the left of it, which is the point of the technique.
  function stagesOf(m, a) {
    const num = (v) => (typeof v === 'number' ? v : null);
    const endpoint = num(m.endpoint_ms);
    const asrFinal = num(m.asr_final_ms);
    const decode = num(m.asr_decode_ms);
    const token = num(m.llm_first_token_ms);
    const sentence = num(m.first_sentence_ms);
    const ttfa = a ? num(a.ttfa_ms) : null;
    const span = (from, to) => (to === null ? null : [from === null ? to : Math.min(from, to), to]);
    return [
      { key: 'speech_end', label: 'speech end', range: [0, 0], note: 'last voiced sample' },
      { key: 'endpoint', label: 'endpoint', range: span(0, endpoint), note: 'silence until the turn is over' },
      {
        key: 'asr_final',
        label: 'ASR final',
        range: span(asrFinal !== null && decode !== null ? asrFinal - decode : null, asrFinal),
        note: 'final Whisper decode',
      },
      { key: 'first_token', label: 'first token', range: span(asrFinal, token), note: 'LLM time to first token' },
      { key: 'first_sentence', label: 'first sentence', range: span(token, sentence), note: 'TTFS: first sentence sent' },
      { key: 'first_audio', label: 'first audio', range: span(sentence, ttfa), note: 'TTFA: first reply audio sent' },
    ];
  }

  function niceStep(maxMs) {
    for (const step of [50, 100, 200, 250, 500, 1000, 2000, 2500, 5000, 10000]) {
      if (maxMs / step <= 6) return step;
    }
    return 20000;
  }

  const fmtMs = (v) => (v === null || v === undefined ? '—' : `${Math.round(v)} ms`);

  function renderWaterfall(n) {
    const turn = stats.turns[n];
    if (!turn.metrics) return; // audio metrics alone: wait for the stage times
    ui.wfEmpty.hidden = true;
    let box = ui.waterfalls.querySelector(`[data-turn="${n}"]`);
    if (box === null) {
      box = el('article', 'wf');
      box.dataset.turn = String(n);
      ui.waterfalls.prepend(box); // newest on top
    }
    const m = turn.metrics;
    const a = turn.audioMetrics;
    const stages = stagesOf(m, a);
    const maxMs = Math.max(100, ...stages.map((s) => (s.range ? s.range[1] : 0)));
    const scale = maxMs * 1.06;
    const pct = (v) => `${((100 * Math.max(0, v)) / scale).toFixed(2)}%`;

    box.replaceChildren();
    const head = el('header', 'wf-head');
    head.append(el('span', 'wf-title', `Turn ${n}`));
    const ttfs = el('span', 'kpi ttfs');
    ttfs.append(el('b', null, fmtMs(m.ttfs_ms)), ' TTFS');
    ttfs.dataset.ms = m.ttfs_ms === null ? '' : String(m.ttfs_ms);
    const ttfa = el('span', 'kpi ttfa');
    const ttfaMs = a ? a.ttfa_ms : null;
    ttfa.append(el('b', null, fmtMs(ttfaMs)), ' TTFA');
    ttfa.dataset.ms = ttfaMs === null || ttfaMs === undefined ? '' : String(ttfaMs);
    head.append(ttfs, ttfa);
    const badges = el('span', 'badges');
    if (m.preemptive) badges.append(el('span', 'badge preemptive', 'preemptive'));
    if (typeof m.wasted_generations === 'number' && m.wasted_generations > 0) {
      badges.append(el('span', 'badge wasted', `wasted generations: ${m.wasted_generations}`));
    }
    if (typeof m.speculative_acceptance === 'number') {
      badges.append(el('span', 'badge spec', `speculative acceptance: ${Math.round(100 * m.speculative_acceptance)}%`));
    }
    if (turn.bargeIn || turn.cancelled) badges.append(el('span', 'badge cut', 'barge-in'));
    else if (typeof m.reply_end === 'string' && m.reply_end !== 'complete') {
      badges.append(el('span', 'badge', `reply end: ${m.reply_end.replace('_', ' ')}`));
    }
    head.append(badges);
    box.append(head);

    const rows = el('div', 'wf-rows');
    for (const stage of stages) {
      const row = el('div', `wf-row ${stage.key}`);
      row.dataset.stage = stage.key;
      row.title = stage.note;
      row.append(el('span', 'wf-label', stage.label));
      const track = el('span', 'wf-track');
      if (stage.range !== null) {
        const [from, to] = stage.range;
        const bar = el('span', stage.key === 'speech_end' ? 'wf-mark' : 'wf-bar');
        bar.style.left = pct(from);
        if (stage.key !== 'speech_end') bar.style.width = `max(3px, ${pct(to - from)})`;
        track.append(bar);
        row.dataset.ms = String(to);
      } else {
        row.classList.add('missing');
        row.dataset.ms = '';
      }
      // The endpoint as a dashed line across every row: what sits left of it
      // was done while the server still waited to be sure the turn was over.
      if (typeof m.endpoint_ms === 'number') {
        const line = el('span', 'wf-endpoint');
        line.style.left = pct(m.endpoint_ms);
        track.append(line);
      }
      row.append(track, el('span', 'wf-ms', stage.range === null ? '—' : fmtMs(stage.range[1])));
      rows.append(row);
    }
    const axis = el('div', 'wf-row wf-axis');
    axis.append(el('span', 'wf-label'));
    const ticks = el('span', 'wf-track');
    const step = niceStep(scale);
    for (let t = 0; t <= scale; t += step) {
      if (t > 0 && scale - t < 0.05 * scale) break; // a label at the very edge would spill out
      const tick = el('span', 'wf-tick', t >= 1000 ? `${t / 1000} s` : `${t}`);
      tick.style.left = pct(t);
      ticks.append(tick);
    }
    axis.append(ticks, el('span', 'wf-ms', 'ms'));
    rows.append(axis);
    box.append(rows);

    const foot = el('footer', 'wf-foot');
    const extra = [
      `ASR decode ${fmtMs(m.asr_decode_ms)}`,
      `LLM TTFT ${fmtMs(m.llm_ttft_ms)}`,
      a ? `TTS first audio ${fmtMs(a.tts_first_audio_ms)}` : null,
      `reply done ${fmtMs(m.done_ms)}`,
      m.completion_tokens > 0 ? `${m.completion_tokens} tokens` : null, // not counted for a cut reply
    ].filter(Boolean);
    foot.textContent = extra.join(' · ');
    box.append(foot);
  }

  // ---- session stats ---------------------------------------------------

  function percentile(values, q) {
    if (values.length === 0) return null;
    const sorted = [...values].sort((x, y) => x - y);
    const pos = (sorted.length - 1) * q; // linear between ranks, as numpy's default
    const lo = Math.floor(pos);
    const hi = Math.min(sorted.length - 1, lo + 1);
    return sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo);
  }

  function renderStats() {
    ui.ttfsP50.textContent = fmtMs(percentile(stats.ttfs, 0.5));
    ui.ttfsP95.textContent = fmtMs(percentile(stats.ttfs, 0.95));
    ui.ttfaP50.textContent = fmtMs(percentile(stats.ttfa, 0.5));
    ui.ttfaP95.textContent = fmtMs(percentile(stats.ttfa, 0.95));
    ui.turnCount.textContent = String(stats.ttfs.length);
    ui.bargeIns.textContent = String(stats.audio.clears);
    ui.played.textContent = `${stats.audio.secondsPlayed.toFixed(1)} s`;
    renderHistory();
  }

  // TTFS and TTFA of every answered turn side by side: drift and outliers
  // show at a glance (the newest 24 turns of the session).
  function renderHistory() {
    const rows = stats.history.slice(-24);
    ui.history.hidden = rows.length === 0;
    if (rows.length === 0) return;
    const top = Math.max(...rows.map((h) => Math.max(h.ttfs, h.ttfa || 0)));
    const pct = (v) => `${((100 * v) / top).toFixed(1)}%`;
    const bars = ui.history.querySelector('.bars');
    bars.replaceChildren();
    for (const h of rows) {
      const label = stats.calls > 1 ? `${h.call}·${h.turn}` : `#${h.turn}`;
      const group = el('span', 'turn-bars');
      group.title = `call ${h.call} turn ${h.turn}: TTFS ${fmtMs(h.ttfs)}, TTFA ${fmtMs(h.ttfa)}`;
      const ttfs = el('span', 'bar ttfs');
      ttfs.style.height = pct(h.ttfs);
      const ttfa = el('span', 'bar ttfa');
      ttfa.style.height = h.ttfa === null ? '0' : pct(h.ttfa);
      group.append(ttfs, ttfa);
      const column = el('span', 'turn-col');
      column.append(group, el('span', 'turn-label', label));
      bars.append(column);
    }
    ui.history.querySelector('.history-top').textContent = fmtMs(top);
  }

  // ---- wiring ----------------------------------------------------------

  // A form, so Enter in the token field starts the call; nothing is ever submitted.
  $('call-form').addEventListener('submit', (e) => {
    e.preventDefault();
    if (call === null) {
      startCall().catch((err) => {
        notice(`Could not start the call: ${err}`, 'error');
        if (call) teardown(call);
        setState('failed');
      });
    } else {
      hangUp();
    }
  });
  ui.mute.addEventListener('click', () => setMuted(!stats.mic.muted));
  setState('idle');
  renderStats();
})();
