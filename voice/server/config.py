"""Server settings: one object composed of each package's own config."""

from __future__ import annotations

from dataclasses import dataclass, field

from asr.config import ASRConfig
from llm.config import LLMConfig
from streaming.tts import TTSConfig
from voice.call.reply_policy import ReplyPolicy
from voice.server.admission import AdmissionConfig
from voice.server.limits import CallLimits


@dataclass
class ServerConfig:
    # Loopback unless told otherwise: a voice server is fronted by a proxy or
    # a carrier's media gateway, never exposed by accident.
    host: str = "127.0.0.1"
    port: int = 8765
    max_calls: int = 16
    # Sentences longer than this many words are cut at a clause boundary.
    sentence_max_words: int = 25
    # A reply's first piece goes to the TTS at its first clause boundary
    # ("I'm sorry for any misunderstanding,") once it has this many words,
    # not at its sentence end (0: whole sentences only, the default). 5
    # lowered the first piece's p50 at every load but not the 8-call p95,
    # and a clause is not the complete sentence TTFS is defined by, nor
    # what an integrator's TTS expects in response.sentence (README
    # "Capacity").
    first_clause_words: int = 0
    # What of a reply the caller hears: sentence cap, loop guard (voice/call/reply_policy.py).
    reply: ReplyPolicy = field(default_factory=ReplyPolicy)
    # A reply whose first sentence is out stops generating while another
    # turn waits for its first, and carries on when none does or when its
    # caller has nearly heard what is out (llm/yielding.py). None: when the
    # LLM runs on this machine's CPU, where a decode step costs each sequence
    # in it about what a sequence alone costs; on a GPU (or a remote engine)
    # a step's cost barely grows with its batch, and a pause buys nothing.
    first_sentences_first: bool | None = None
    # How many replies generate their first sentence at once, where replies
    # step aside (above): the others wait their turn, endpointed turns before
    # preemptive ones (streaming/fair_share.FirstSentences.lane). 0: no
    # limit (the default: one lane won on the engine alone but not yet in a
    # whole-server run, README "Capacity"), 1: one at a time.
    first_sentence_lanes: int = 0
    # A reply whose first sentence is out generates the next one only once
    # its caller has had asr.resume_grace_s to go on (and no later than
    # llm/yielding.py's pacing allows, so the next sentence is not late): a
    # caller who resumes then costs no more tokens (the reply is taken
    # back), where each token costs a CPU ~10-25 ms (README "Capacity").
    # None: where replies step aside (above). A call whose grace is 0 has
    # no hold.
    hold_for_resume: bool | None = None
    # The agent speaks first on pickup: fixed text, or generated with these
    # instructions (None: the caller speaks first). Calls may set their own.
    greeting: str | None = None
    greeting_instructions: str | None = None
    # Keypresses with no speech after them are answered as a turn of their
    # own once no key has come for this long ("Press 1 to confirm": the
    # caller presses 1 and waits), at once after "#"; speech before then
    # takes them into its turn. 0: they wait for the caller's next words.
    # Twilio's <Gather> waits 5 s for another key; a one-key menu answer
    # should not, and 2 s still lets a caller key in a card number at an
    # ordinary pace (a key every 0.3-1 s).
    keypad_answer_s: float = 2.0
    # A barge-in whose speech held no words (a cough, a door, the TV) cut the
    # reply for nothing: on audio transports the reply goes on from what the
    # caller heard (CallSession.go_on_after_noise). False: it stays cut.
    go_on_after_noise: bool = True
    asr: ASRConfig = field(default_factory=ASRConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    # Per-call limits (idle timeout, stuck readers, drain deadline): voice/server/limits.py.
    limits: CallLimits = field(default_factory=CallLimits)
    # Load-based refusal of new calls beyond max_calls: voice/server/admission.py.
    admission: AdmissionConfig = field(default_factory=AdmissionConfig)
    # Bearer token required on websocket upgrades (None: no auth; loopback bind).
    auth_token: str | None = None
    # Browser pages on other origins allowed to open call websockets (the
    # server's own page always is), e.g. "https://app.example.com".
    allowed_origins: list[str] = field(default_factory=list)
    # Twilio's account auth token: /twilio upgrades must carry a valid
    # X-Twilio-Signature (HTTP 403 otherwise) instead of the bearer token.
    twilio_auth_token: str | None = None
    # The codec Telnyx plays what we send in: its bidirectional stream's own
    # setting (stream_bidirectional_codec / TeXML bidirectionalCodec, PCMU
    # unless set), apart from the caller's codec; a call may name it in its
    # custom parameters (bidirectional_codec).
    telnyx_outbound_codec: str = "PCMU"
    # The origin carriers connect to (https://voice.example.com) when a proxy
    # sits in front; signatures are over that URL. None: from the Host header.
    public_url: str | None = None
    # Where each call's conversation is kept between turns, so a call that
    # re-attaches (on this replica or another) picks it up: "memory" (one
    # process) or redis://host:port/db (every replica; voice/call/store.py).
    state_url: str | None = None
    state_ttl_s: float = 3600.0
    # Shared secret a carrier without upgrade signatures passes as the custom
    # parameter ``firstline_secret``; checked at ``start`` (None: not required).
    carrier_secret: str | None = None
    # Whether a carrier's custom parameters may set the call's system prompt.
    # Off: whoever can place a call could otherwise rewrite the agent.
    allow_custom_prompt: bool = False
    # Voice for the audio transports (telephony, Realtime); text-only calls never load it.
    tts: TTSConfig = field(default_factory=TTSConfig)
    # Asterisk AudioSocket is raw TCP, so it gets its own listener (None: off; 0: any free port).
    audiosocket_port: int | None = None
    # AudioSocket has no credentials on the wire: loopback unless told
    # otherwise (None: same as ``host``), and an allow-list of source
    # networks (CIDRs; empty: any, or loopback only when auth is on).
    audiosocket_host: str | None = "127.0.0.1"
    audiosocket_allow: list[str] = field(default_factory=list)
    # Concurrent calls from one source address, all listeners together (0: no cap).
    max_calls_per_address: int = 8
    # New calls a minute from one source address, after a burst of twice the
    # cap above (0: no limit; off with the cap). A call's allowances (its audio budget, its
    # malformed and message allowances, its ASR share) are its own: an
    # address hanging up and calling again, eight at a time, got them all
    # fresh each time, as often as it could reconnect.
    call_rate_per_address: float = 60.0
    # Open TCP connections from one source address on the websocket listener,
    # counted at accept, before the peer sends a byte (handshakes under way,
    # HTTP requests and calls together; 0: no cap). None: four per call the
    # per-address cap allows, at least 32 (off with that cap off). A peer
    # that opens sockets and never sends its upgrade holds each one until
    # the opening handshake times out; without this cap one address could
    # hold every descriptor the process has. Exempt sources (below, and
    # trusted proxies, whose connections carry many callers) are not capped.
    max_connections_per_address: int | None = None
    # Sources the per-address cap does not apply to: a reverse proxy or a
    # carrier's media gateway carries every caller from one address. By
    # default loopback (a proxy on this host, local tools and benchmarks).
    per_address_exempt: list[str] = field(default_factory=lambda: ["127.0.0.0/8", "::1/128"])
    # Load balancers whose X-Forwarded-For is believed (CIDRs; empty: none).
    # Behind HAProxy (docs/scaling.md) the caller's address is then the
    # right-most X-Forwarded-For entry that is not itself a trusted proxy,
    # so the per-address cap and the refusal logs see callers, not the LB.
    trusted_proxies: list[str] = field(default_factory=list)
    # OpenTelemetry traces per turn (voice/server/tracing.py): off unless enabled.
    # Endpoint None with tracing on: the standard OTEL_EXPORTER_OTLP_* variables.
    tracing: bool = False
    otel_endpoint: str | None = None
    # The built-in browser call page (GET /, /demo; voice/server/web/). On by
    # default so `make serve` can be tried at once; production turns it off.
    demo_page: bool = True

    @property
    def connections_per_address(self) -> int:
        """The open-connection cap per source address in force (0: none)."""
        if self.max_connections_per_address is not None:
            return max(0, self.max_connections_per_address)
        if self.max_calls_per_address <= 0:
            return 0
        return max(32, 4 * self.max_calls_per_address)

    @property
    def replies_step_aside(self) -> bool:
        if self.first_sentences_first is not None:
            return self.first_sentences_first
        return self.llm.engine != "remote" and self.llm.device == "cpu"

    @property
    def holds_for_resume(self) -> bool:
        wanted = self.replies_step_aside if self.hold_for_resume is None else self.hold_for_resume
        # The hold rides on stepping aside (llm/yielding.py); each call's own
        # grace (which a call may set) bounds it, in voice/call/turn.py.
        return wanted and self.replies_step_aside

    @property
    def first_sentence_lanes_in_use(self) -> int:
        return self.first_sentence_lanes if self.replies_step_aside else 0
