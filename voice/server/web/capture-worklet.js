// firstline call page: microphone capture on the audio thread.
//
// Runs in the AudioWorkletGlobalScope (not ScriptProcessor: that runs on the
// main thread, so a busy page would drop or delay the caller's audio).
// Input: the AudioContext's own rate (usually 48000 or 44100 Hz), mono.
// Output: 20 ms frames of 16 kHz signed 16-bit little-endian PCM, posted to
// the page as transferable ArrayBuffers: exactly what the native protocol's
// `"audio": {"encoding": "pcm16", "sample_rate": 16000}` expects.
//
// Downsampling: a windowed-sinc low-pass (cutoff 7 kHz, under the 8 kHz
// Nyquist of the output) evaluated only at the two input samples around
// each output instant, then linear interpolation between them. Cheap (two
// 31-tap dot products per output sample) and free of the aliasing that a
// bare "take every third sample" would fold into Whisper's input.

'use strict';

const TAPS = 31; // odd: a symmetric filter with a whole-sample delay
const RING = 64; // power of two >= TAPS + 2

function lowPass(inRate, cutoffHz) {
  const fc = Math.min(cutoffHz / inRate, 0.5); // cycles per input sample
  const mid = (TAPS - 1) / 2;
  const h = new Float32Array(TAPS);
  let sum = 0;
  for (let k = 0; k < TAPS; k++) {
    const x = k - mid;
    const sinc = x === 0 ? 2 * fc : Math.sin(2 * Math.PI * fc * x) / (Math.PI * x);
    // Blackman window: ~-74 dB side lobes, plenty for speech.
    const w = 0.42 - 0.5 * Math.cos((2 * Math.PI * k) / (TAPS - 1)) + 0.08 * Math.cos((4 * Math.PI * k) / (TAPS - 1));
    h[k] = sinc * w;
    sum += h[k];
  }
  for (let k = 0; k < TAPS; k++) h[k] /= sum; // unity gain at DC
  return h;
}

class CaptureProcessor extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const opts = (options && options.processorOptions) || {};
    this.outRate = opts.targetRate || 16000;
    this.frameSamples = opts.frameSamples || Math.round(this.outRate * 0.02);
    // `sampleRate` is the AudioWorkletGlobalScope's: the context's rate.
    this.step = sampleRate / this.outRate;
    this.filter = this.step > 1 ? lowPass(sampleRate, Math.min(7000, this.outRate * 0.4375)) : null;
    this.ring = new Float32Array(RING);
    this.written = 0; // input samples seen so far
    this.t = TAPS; // input-sample time of the next output sample (after the filter fills)
    this.frame = new Int16Array(this.frameSamples);
    this.fill = 0;
    this.energy = 0;
  }

  // The low-passed input at absolute input index i (i must still be in the ring).
  filtered(i) {
    const ring = this.ring;
    if (this.filter === null) return ring[i & (RING - 1)];
    const h = this.filter;
    let acc = 0;
    for (let k = 0; k < TAPS; k++) acc += h[k] * ring[(i - k) & (RING - 1)];
    return acc;
  }

  emit(sample) {
    const s = Math.max(-1, Math.min(1, sample));
    this.frame[this.fill++] = s < 0 ? s * 0x8000 : s * 0x7fff;
    this.energy += s * s;
    if (this.fill === this.frameSamples) {
      const pcm = this.frame.buffer;
      const level = Math.sqrt(this.energy / this.frameSamples);
      this.port.postMessage({ pcm, level }, [pcm]); // transferred: no copy
      this.frame = new Int16Array(this.frameSamples);
      this.fill = 0;
      this.energy = 0;
    }
  }

  process(inputs) {
    const input = inputs[0];
    const channel = input && input[0];
    if (!channel) return true; // no input connected yet (or the track ended): keep the node alive
    for (let n = 0; n < channel.length; n++) {
      this.ring[this.written & (RING - 1)] = channel[n];
      this.written++;
      // Emit every output sample whose two neighbouring input samples exist.
      while (this.t + 1 < this.written) {
        const i = Math.floor(this.t);
        const frac = this.t - i;
        this.emit(this.filtered(i) * (1 - frac) + this.filtered(i + 1) * frac);
        this.t += this.step;
      }
    }
    return true;
  }
}

registerProcessor('firstline-capture', CaptureProcessor);
