"""`firstline` command line: `firstline serve [options]`."""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # models are local; never wait on a hub

from asr.config import (
    END_OF_TURN_POLICIES,
    LLM_END_OF_TURN_POLICIES,
    SMART_TURN_POLICIES,
    ASRConfig,
    decoder_threads_for,
)
from llm.config import (
    CPU_LLAMACPP_REPLICAS,
    CPU_LLAMACPP_SLOTS,
    DEFAULT_EXAMPLE_TURNS,
    MAX_LLAMACPP_SLOTS,
    MAX_VLLM_SEQUENCES,
    LLMConfig,
    SpeculationConfig,
    check_replicas,
    replicas_for,
    slots_for,
    threads_for,
)
from llm.remote_engine import REMOTE_KEY_ENV
from llm.sampling import add_sampling_arguments, sampling_from_args
from streaming.addresses import is_loopback
from streaming.open_files import raise_open_files_limit
from voice.call.reply_policy import ReplyPolicy
from voice.call.store import STORE_SCHEMES
from voice.server.admission import AdmissionConfig
from voice.server.config import ServerConfig
from voice.server.limits import CallLimits
from voice.server.log_format import configure_logging
from voice.server.signatures import check_public_url

log = logging.getLogger(__name__)


def _network(value: str) -> str:
    """A CIDR or address flag, checked when parsed (a clear usage error, not
    a traceback when the server builds its registry)."""
    try:
        ipaddress.ip_network(value.strip(), strict=False)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an address or network: {value!r}") from None
    return value.strip()


# A trusted proxy's X-Forwarded-For names the caller: trusting networks this
# wide lets anyone in them claim any address and slip the per-address cap
# and the abuse cool-down (a proxy is a host or a small subnet).
WIDEST_TRUSTED_PREFIX = {4: 8, 6: 32}


def _trusted_proxy(value: str) -> str:
    value = _network(value)
    net = ipaddress.ip_network(value, strict=False)
    if net.prefixlen < WIDEST_TRUSTED_PREFIX[net.version]:
        raise argparse.ArgumentTypeError(
            f"{value}: too wide to trust (anyone in it could claim any caller address in X-Forwarded-For); "
            f"name the proxies' addresses or subnet (/{WIDEST_TRUSTED_PREFIX[net.version]} at the widest)"
        )
    return value


def _vad_end_margin(value: str) -> float:
    """--vad-end-margin: how far below the VAD threshold a chunk must fall to
    count as silence; a usage error outside 0..0.45 (the threshold is 0.5)."""
    try:
        margin = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {value!r}") from None
    if not 0.0 <= margin <= 0.45:
        raise argparse.ArgumentTypeError(f"must be in 0..0.45, got {margin:g}")
    return margin


# Bounds on --example-turns: they ride in every prompt of every call.
MAX_EXAMPLE_TURNS = 8
MAX_EXAMPLE_CHARS = 500


def _example_turns(value: str) -> tuple[tuple[str, str], ...]:
    """--example-turns: "none", "default", or a JSON file holding a list of
    [caller words, reply] pairs; anything else is a usage error."""
    if value == "none":
        return ()
    if value == "default":
        return DEFAULT_EXAMPLE_TURNS
    try:
        data = json.loads(Path(value).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise argparse.ArgumentTypeError(f"cannot read {value!r} as JSON: {exc}") from None
    pairs = data if isinstance(data, list) else None
    if (
        pairs is None
        or not 0 < len(pairs) <= MAX_EXAMPLE_TURNS
        or not all(
            isinstance(p, list)
            and len(p) == 2
            and all(isinstance(t, str) and 0 < len(t.strip()) <= MAX_EXAMPLE_CHARS for t in p)
            for p in pairs
        )
    ):
        raise argparse.ArgumentTypeError(
            f"{value!r} must hold a list of 1..{MAX_EXAMPLE_TURNS} [caller words, reply] pairs of "
            f"non-empty strings of at most {MAX_EXAMPLE_CHARS} characters"
        )
    return tuple((user.strip(), reply.strip()) for user, reply in pairs)


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(f"FIRSTLINE_{name}", default)


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
# Flags whose value must be at least this (a value below would start a server
# that refuses every call, or hand a library a number it reads otherwise).
AT_LEAST = {"max_calls": 1, "max_asr_queue": 0, "llm_prompt_cache_mib": 0, "max_tokens": 1}
# Timeouts that must be above zero: 0 failed every turn at once, and the
# engine's own requests (aiohttp reads a total of 0 as none) waited forever.
ABOVE_ZERO = ("llm_first_token_timeout_s",)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, checked: argparse checks ``choices`` only on values
    typed on it, not on defaults, so a FIRSTLINE_* variable outside them
    (FIRSTLINE_ENGINE=vLLM) would start a server that quietly does something
    else; numbers out of range would start one that refuses every call."""
    parser = build_parser()
    args = parser.parse_args(argv)
    for action in _command_actions(parser, args.command):
        value = getattr(args, action.dest, None)
        if action.choices is not None and value is not None and not isinstance(value, list):
            if value not in action.choices:
                flag = action.option_strings[-1] if action.option_strings else action.dest
                parser.error(f"{flag}: {value!r} (from the environment?) is not one of {', '.join(action.choices)}")
    if args.command == "serve":
        for dest, least in AT_LEAST.items():
            value = getattr(args, dest, None)
            if value is not None and value < least:
                parser.error(f"--{dest.replace('_', '-')} must be {least} or more (got {value})")
        for dest in ABOVE_ZERO:
            value = getattr(args, dest)
            if not value > 0:  # NaN too
                parser.error(f"--{dest.replace('_', '-')} must be more than 0 (got {value})")
        if not 0 <= args.port <= 65535:
            parser.error(f"--port must be 0-65535 (got {args.port})")
        audiosocket = args.audiosocket_port
        if audiosocket is not None:
            if not 0 <= audiosocket <= 65535:
                parser.error(f"--audiosocket-port must be 0-65535 (got {audiosocket})")
            # The same port on one address (or on every address) cannot be
            # bound twice; found now, not after the models have loaded.
            anywhere = {"", "0.0.0.0", "::"}
            audiosocket_host = args.audiosocket_host or ServerConfig.audiosocket_host or ""
            hosts_meet = audiosocket_host == args.host or bool({audiosocket_host, args.host} & anywhere)
            if audiosocket != 0 and audiosocket == args.port and hosts_meet:
                parser.error(f"--audiosocket-port {audiosocket} is --port's on the same address")
        _refuse_open_doors(parser, args)
    return args


def _refuse_open_doors(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """A listener reachable beyond this machine with nothing to check a
    caller by would let anyone who finds the port place calls on the
    operator's models (and read what the agent says): refused at start,
    unless the operator says so with --no-auth (a private network, a proxy
    that authenticates)."""
    if args.no_auth:
        return
    if not args.auth_token and not is_loopback(args.host):
        parser.error(
            f"--host {args.host or '(all)'} listens beyond this machine, and no --auth-token (or "
            "FIRSTLINE_AUTH_TOKEN) is set: anyone who reaches the port could place calls. Set a token, "
            "or pass --no-auth (FIRSTLINE_NO_AUTH=1) where something else keeps strangers out"
        )
    if args.audiosocket_port is not None and not args.audiosocket_allow:
        host = ServerConfig.audiosocket_host if args.audiosocket_host is None else args.audiosocket_host
        if not is_loopback(host) and not args.auth_token:
            parser.error(
                f"--audiosocket-host {host or '(all)'} listens beyond this machine, and AudioSocket "
                "carries no credential: name the PBX's network with --audiosocket-allow CIDR, "
                "or pass --no-auth (FIRSTLINE_NO_AUTH=1)"
            )


def _command_actions(parser: argparse.ArgumentParser, command: str) -> list[argparse.Action]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return list(action.choices[command]._actions)
    return []


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="firstline", description="Low-latency voice inference server")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the websocket server")
    serve.add_argument("--host", default=_env("HOST", "127.0.0.1"), help="bind address (default loopback)")
    # A string default goes through type=int too: a bad FIRSTLINE_PORT is a usage error, not a traceback.
    serve.add_argument("--port", type=int, default=_env("PORT") or "8765")
    serve.add_argument("--max-calls", type=int, default=ServerConfig.max_calls)
    serve.add_argument(
        "--engine",
        choices=["llamacpp", "vllm", "remote"],
        default=_env("ENGINE", "llamacpp"),
        help="remote: an OpenAI-compatible server or pool (--remote-url)",
    )
    # Fault tolerance (llm/supervisor.py, llm/remote_engine.py).
    serve.add_argument(
        "--engine-isolation",
        choices=["process", "inprocess"],
        default=_env("ENGINE_ISOLATION", LLMConfig.isolation),
        help="process: the engine runs in a supervised child, restarted if it dies",
    )
    serve.add_argument(
        "--remote-url",
        action="append",
        default=[],
        help="with --engine remote: OpenAI-compatible base URL; repeat for a pool (calls pinned, failover)",
    )
    serve.add_argument(
        "--secondary-url",
        action="append",
        default=[],
        help="where turns go while the supervised engine is down; repeat for a pool",
    )
    serve.add_argument("--remote-model", default=None, help="model name for remote servers (default: their first)")
    serve.add_argument("--llm-first-token-timeout-s", type=float, default=10.0)
    serve.add_argument("--llm-model", default=_env("LLM_MODEL"), help="GGUF (llamacpp) or HF folder (vllm)")
    serve.add_argument(
        "--llm-embedded-quant",
        choices=["Q8_0", "Q4_0", "shipped"],
        default="Q8_0",
        help="the embedded GGUF on a CPU: requantized once to Q8_0 (faster prefill in llama.cpp), or to Q4_0 "
        "(llama.cpp repacks it for AVX2/AVX-512: cheaper tokens, but longer first sentences that ignore the "
        "instructions more often; README), or as shipped (Q4_1); a --llm-model is always used as is",
    )
    serve.add_argument("--llm-device", choices=["cpu", "cuda"], default=_env("LLM_DEVICE", "cpu"))
    serve.add_argument(
        "--llm-enforce-eager",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="vLLM: no CUDA graphs (faster start, slower decode); default: eager on a CPU only",
    )
    serve.add_argument(
        "--llm-threads", type=int, default=0, help="LLM engine CPU threads (0: half the cores, at least 1, at most 4)"
    )
    serve.add_argument(
        "--llm-thread-poll",
        type=int,
        default=LLMConfig.thread_poll,
        help="llama.cpp threadpool between steps: 0 sleep .. 100 spin (no effect on OpenMP builds such as the "
        "xllamacpp wheel)",
    )
    serve.add_argument(
        "--llm-parallel",
        type=int,
        default=0,
        help="llama.cpp slots / vLLM max sequences (0: one per --max-calls on vLLM and llama.cpp on CUDA, at "
        f"most {MAX_VLLM_SEQUENCES} / {MAX_LLAMACPP_SLOTS}; {CPU_LLAMACPP_SLOTS} for llama.cpp on the CPU)",
    )
    serve.add_argument(
        "--llm-replicas",
        type=int,
        default=0,
        help="copies of the llama.cpp engine, each with --llm-threads threads and --llm-parallel slots, so "
        f"turns that reach the LLM together run on separate cores (0: {CPU_LLAMACPP_REPLICAS} for llama.cpp on "
        "a CPU with 2 cores or more, else 1)",
    )
    serve.add_argument(
        "--llm-home-slack",
        type=int,
        default=LLMConfig.replica_home_slack,
        help="a call's requests stay on the llama.cpp copy that holds its history while that copy has at most "
        "this many more requests under way than the least busy one (0: always the least busy; default "
        "%(default)s)",
    )
    serve.add_argument(
        "--llm-prompt-cache-mib",
        type=int,
        default=LLMConfig.prompt_cache_ram_mib,
        help="llama.cpp host-RAM prompt cache bound (MiB; 0: off)",
    )
    serve.add_argument(
        "--llm-slot-choice",
        choices=["lru-restore", "similarity"],
        default=LLMConfig.slot_choice,
        help="how llama.cpp picks a slot: the least recently used one, restoring the call's saved prompt from the "
        "host-RAM cache, or llama.cpp's prompt similarity (default %(default)s)",
    )
    serve.add_argument("--max-tokens", type=int, default=96)
    # --llm-temperature, --llm-repetition-penalty, ...: defaults for every reply (llm/sampling.py).
    add_sampling_arguments(serve, prefix="llm-")
    serve.add_argument("--system-prompt", default=None)
    serve.add_argument(
        "--example-turns",
        type=_example_turns,
        default=DEFAULT_EXAMPLE_TURNS,
        metavar="FILE|none|default",
        help="caller/reply example pairs after the system prompt in every prompt (few-shot; a JSON list of "
        "[caller, reply] pairs; none: no examples). Calls that set their own prompt get none",
    )
    serve.add_argument(
        "--reply-max-sentences",
        type=int,
        default=ReplyPolicy.max_sentences,
        help="a reply stops (and its generation is aborted) after this many sentences (0: no limit)",
    )
    serve.add_argument(
        "--first-clause-words",
        type=int,
        default=ServerConfig.first_clause_words,
        help="a reply's first piece goes out at its first clause boundary (a comma, a dash, before 'and'...) "
        "once it has this many words, instead of at its sentence end: the TTS starts sooner, at the price of "
        "a pause where a speaker might not make one (e.g. 5; default %(default)s: whole sentences only)",
    )
    serve.add_argument(
        "--reply-fallback",
        default=ReplyPolicy.fallback,
        help="said when a reply got no sentence out (the token cap cut it, it only looped, the model said "
        "nothing), so the caller never hears silence ('': say nothing)",
    )
    serve.add_argument(
        "--reply-failure-line",
        default=ReplyPolicy.failure_line,
        help="said when the LLM failed before the reply's first sentence (a phone caller hears no error "
        "event; silence sounds like a dropped call) ('': say nothing)",
    )
    serve.add_argument("--greeting", default=_env("GREETING"), help="say this when a call is picked up")
    serve.add_argument(
        "--no-go-on-after-noise",
        action="store_true",
        help="a reply that speech with no words (a cough, a door) cut stays cut; by default it goes on "
        "from what the caller heard",
    )
    serve.add_argument(
        "--keypad-answer-ms",
        type=float,
        default=ServerConfig.keypad_answer_s * 1000,
        help="answer keypresses the caller made without speaking once no key has come for this long, at once "
        "after '#' (0: they join the caller's next spoken turn)",
    )
    serve.add_argument(
        "--greeting-instructions",
        default=None,
        help="generate a greeting on pickup with these instructions (e.g. 'Greet the caller and ask how to help.')",
    )
    serve.add_argument(
        "--no-loop-guard",
        action="store_true",
        help="send sentences that repeat an earlier one (default: a repeat ends the reply)",
    )
    serve.add_argument(
        "--first-sentences-first",
        dest="first_sentences_first",
        action="store_const",
        const=True,
        default=None,
        help="a reply whose first sentence is out steps aside while other turns wait for theirs, and carries on "
        "before its caller needs the next sentence (default: when the LLM runs on this machine's CPU)",
    )
    serve.add_argument(
        "--no-first-sentences-first",
        dest="first_sentences_first",
        action="store_const",
        const=False,
        help="replies keep generating after their first sentence while other turns wait for theirs",
    )
    serve.add_argument(
        "--no-hold-for-resume",
        dest="hold_for_resume",
        action="store_const",
        const=False,
        default=None,
        help="a reply whose first sentence is out generates the next at once, not after the caller has had "
        "--resume-grace-s to go on (default: hold, where replies step aside)",
    )
    serve.add_argument(
        "--first-sentence-lanes",
        type=int,
        default=None,
        help="replies that generate their first sentence at once where replies step aside "
        "(--first-sentences-first); the others wait their turn, endpointed turns first (default 0: no limit)",
    )
    serve.add_argument(
        "--speculation",
        choices=["none", "ngram", "eagle3", "draft_model", "mtp", "suffix"],
        default=_env("SPECULATION", "none"),
    )
    serve.add_argument("--speculative-tokens", type=int, default=4)
    serve.add_argument("--draft-model", default=None, help="draft / EAGLE-3 / MTP model path (GPU)")
    serve.add_argument("--asr-model", default=_env("ASR_MODEL"), help="CTranslate2 Whisper folder or size name")
    serve.add_argument("--asr-device", choices=["cpu", "cuda", "auto"], default=_env("ASR_DEVICE", "cpu"))
    serve.add_argument(
        "--asr-compute-type",
        default=_env("ASR_COMPUTE_TYPE", "auto"),
        help="CTranslate2 compute type (auto: int8 on a CPU, float16 on a GPU)",
    )
    serve.add_argument(
        "--asr-threads",
        type=int,
        default=0,
        help="Whisper decoder CPU threads (0: the cores the LLM leaves, at most 4)",
    )
    serve.add_argument(
        "--asr-nice",
        type=int,
        default=ASRConfig.nice,
        help="OS nice value added to the Whisper decoder's threads (ranks them below the LLM: for an LLM given "
        "every core; 0: same rank)",
    )
    serve.add_argument(
        "--asr-process",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="run the Whisper decoder in a child process of its own: it never waits for the server's GIL, and a "
        "decoder crash costs the decodes it was running, not the server (a new one starts). Default: on a CPU, "
        "off on a GPU",
    )
    serve.add_argument(
        "--asr-decode-timeout-s",
        type=float,
        default=ASRConfig.decode_timeout_s,
        help="a decode in the decoder process running longer than this is taken for hung: the process is killed, "
        "that turn fails and a new one starts (default %(default)s; 0: no limit)",
    )
    serve.add_argument(
        "--asr-finals-nice",
        type=int,
        default=ASRConfig.finals_nice,
        help="give finals (pause and turn-end decodes) a decoder of their own at this nice value (default: they "
        "share the --asr-nice decoder)",
    )
    serve.add_argument("--endpoint-silence-ms", type=int, default=500)
    serve.add_argument("--no-partials", action="store_true")
    serve.add_argument(
        "--audiosocket-port", type=int, default=None, help="also listen for Asterisk AudioSocket (TCP) on this port"
    )
    # Latency techniques, each switchable so benchmarks/ttfs.py can compare.
    serve.add_argument("--no-preemptive", action="store_true", help="start ASR final + LLM only at the endpoint")
    serve.add_argument("--fixed-endpoint", action="store_true", help="fixed silence window, not adaptive")
    serve.add_argument(
        "--endpoint-sentence-words",
        type=int,
        choices=range(1, 21),
        metavar="{1..20}",
        default=ASRConfig.endpoint_sentence_words,
        help="a turn whose words end on a period after at least this many words waits the short window "
        "(default %(default)s; shorter ones wait the unsure window)",
    )
    serve.add_argument(
        "--vad-end-margin",
        type=_vad_end_margin,
        default=ASRConfig.vad_end_margin,
        help="a chunk counts as silence toward the pause and endpoint windows only this far below the VAD "
        "threshold (0.5); 0: any chunk below it (default %(default)s)",
    )
    serve.add_argument(
        "--end-of-turn",
        choices=END_OF_TURN_POLICIES,
        default=_env("END_OF_TURN", ASRConfig.end_of_turn),
        help="how a pause's window is chosen (asr/end_of_turn.py; benchmarks/end_of_turn.py compares them)",
    )
    serve.add_argument(
        "--llm-sentence-end-threshold",
        type=float,
        default=ASRConfig.llm_sentence_end_threshold,
        help="under an --end-of-turn policy ending in +llm: below this P(the sentence ends here) wait the longest",
    )
    serve.add_argument(
        "--whisper-sentence-end-threshold",
        type=float,
        default=ASRConfig.whisper_sentence_end_threshold,
        help="under --end-of-turn whisper+rules(+llm): below this share of a full stop among the marks Whisper "
        "could write after the caller's last word, wait the longest window (default %(default)s)",
    )
    serve.add_argument(
        "--whisper-hold-threshold",
        type=float,
        default=ASRConfig.whisper_hold_threshold,
        help="under --end-of-turn whisper+rules(+llm): below this share wait the longest window, between it and "
        "--whisper-sentence-end-threshold the unsure one (0: the sentence-end threshold, no middle)",
    )
    serve.add_argument(
        "--endpoint-sure-ms",
        type=int,
        default=round(ASRConfig.endpoint_sure_s * 1000),
        help="a finished sentence Whisper closes with at least --whisper-sure-threshold of the marks (under "
        "--end-of-turn whisper+rules(+llm)), or a number read out in full (any policy), ends after this much silence "
        "(0: off; default %(default)s; README 'Shorter windows': worth little where the pause decode is slow)",
    )
    serve.add_argument(
        "--whisper-sure-threshold",
        type=float,
        default=ASRConfig.whisper_sure_threshold,
        help="the share of a full stop that --endpoint-sure-ms needs (default %(default)s)",
    )
    serve.add_argument(
        "--endpoint-answer-ms",
        type=int,
        default=0,
        help="window after a short answer on its own ('Yes.', 'Tuesday.'); 0: the unsure window, 700 ms "
        "(default; 300 cut off 10 of 10 callers who went on after one in benchmarks/data/eot/answers.json)",
    )
    serve.add_argument(
        "--resume-grace-s",
        type=float,
        default=ASRConfig.resume_grace_s,
        help="a caller who talks again this soon after the reply began was not done: one turn with the next (0: off)",
    )
    serve.add_argument(
        "--smart-turn-model",
        default=_env("SMART_TURN_MODEL"),
        help="Smart Turn v3.2 ONNX (default: installed pipecat-ai, or `python -m asr.end_of_turn --fetch`'s cache)",
    )
    serve.add_argument("--no-incremental-prefill", action="store_true", help="don't prefill the LLM while speaking")
    serve.add_argument(
        "--asr-scheduler",
        choices=["deadline", "fifo"],
        default="deadline",
        help="deadline: finals before partials, one partial per call, partials shed under load",
    )
    serve.add_argument(
        "--asr-batch-size",
        type=int,
        default=ASRConfig.batch_size,
        help="decodes from different calls batched into one Whisper call (1: batching off; 0: 1 on a CPU, 16 on a GPU)",
    )
    serve.add_argument(
        "--asr-pad-windows",
        type=_pad_windows,
        default=ASRConfig.pad_windows_s,
        metavar="S[,S...]",
        help="Whisper windows in seconds, e.g. 10,20,30: each decode is padded to the smallest that holds "
        "its audio (longer audio: 30 s); benchmarks/asr_padding.py measures the choice",
    )
    serve.add_argument(
        "--asr-no-speech-threshold",
        type=float,
        default=ASRConfig.no_speech_threshold,
        help="a decode Whisper gives a no-speech probability above this, and a mean log-probability below "
        "--asr-no-speech-logprob, is noise: no turn (default 0.7; a negative value turns it off)",
    )
    serve.add_argument("--asr-no-speech-logprob", type=float, default=ASRConfig.no_speech_logprob)
    serve.add_argument(
        "--asr-batch-wait-ms",
        type=float,
        default=ASRConfig.batch_wait_ms,
        help="a batch that is not full waits at most this long for more decodes",
    )
    serve.add_argument(
        "--asr-partial-budget",
        type=float,
        default=None,
        help="decoder seconds per second all partials together may use (0: no limit; finals are never limited; "
        "default: 0.08 on a CPU, no limit on a GPU)",
    )
    serve.add_argument(
        "--asr-partials-behind-finals",
        action="store_true",
        help="queue a partial submitted while finals wait instead of shedding it: more live captions, later finals",
    )
    serve.add_argument("--log-level", type=str.upper, choices=LOG_LEVELS, default="INFO")
    serve.add_argument("--log-format", choices=["text", "json"], default=_env("LOG_FORMAT", "text"))
    # Limits and admission (voice/server/limits.py, voice/server/admission.py).
    serve.add_argument(
        "--idle-timeout-s",
        type=float,
        default=CallLimits.idle_timeout_s,
        help="close a call silent this long (0: never)",
    )
    serve.add_argument(
        "--max-call-s",
        type=float,
        default=CallLimits.max_call_s,
        help="end a call this long after it started, however busy (0: no limit; default 4 h, Twilio's own)",
    )
    serve.add_argument(
        "--send-timeout-s", type=float, default=CallLimits.send_timeout_s, help="drop a call whose client stops reading"
    )
    serve.add_argument(
        "--drain-timeout-s", type=float, default=CallLimits.drain_timeout_s, help="on SIGTERM, live calls get this long"
    )
    serve.add_argument(
        "--ttfs-target-ms", type=float, default=0.0, help="refuse new calls while recent p95 TTFS is above (0: off)"
    )
    serve.add_argument(
        "--max-asr-queue",
        type=int,
        default=AdmissionConfig.max_asr_queue,
        help="refuse new calls above this ASR backlog (0: off)",
    )
    serve.add_argument(
        "--llm-down-grace-s",
        type=float,
        default=AdmissionConfig.llm_down_grace_s,
        help="refuse new calls (503 llm_unavailable) once no LLM engine has answered for this long (negative: never)",
    )
    serve.add_argument(
        "--auth-token",
        default=_env("AUTH_TOKEN"),
        help="require 'Authorization: Bearer TOKEN' on call upgrades (or FIRSTLINE_AUTH_TOKEN)",
    )
    serve.add_argument(
        "--no-auth",
        action="store_true",
        default=(_env("NO_AUTH", "") or "").strip().lower() in ("1", "true", "yes", "on"),
        help="listen beyond loopback with no --auth-token (or FIRSTLINE_NO_AUTH=1): refused at start "
        "otherwise; for a private network or a proxy that authenticates",
    )
    # Safe on the public internet (docs/security.md): one registry for every listener.
    serve.add_argument(
        "--max-calls-per-address",
        type=int,
        default=ServerConfig.max_calls_per_address,
        help="concurrent calls from one source address, all listeners together (0: no cap)",
    )
    serve.add_argument(
        "--call-rate-per-address",
        type=float,
        default=ServerConfig.call_rate_per_address,
        metavar="PER_MIN",
        help="new calls a minute from one source address, after a burst of twice --max-calls-per-address (0: no limit)",
    )
    serve.add_argument(
        "--per-address-exempt",
        action="append",
        type=_network,
        default=None,
        metavar="CIDR",
        help="sources the per-address cap skips, e.g. your proxy (repeatable; default: loopback)",
    )
    serve.add_argument(
        "--trusted-proxy",
        action="append",
        type=_trusted_proxy,
        default=None,
        metavar="CIDR",
        help="load balancer whose X-Forwarded-For names the caller (repeatable; e.g. HAProxy's address)",
    )
    serve.add_argument(
        "--audiosocket-host",
        default=None,
        help="AudioSocket bind address (default 127.0.0.1: loopback unless told otherwise)",
    )
    serve.add_argument(
        "--audiosocket-allow",
        action="append",
        type=_network,
        default=[],
        metavar="CIDR",
        help="source networks AudioSocket accepts (repeatable; default any, or this host only with --auth-token)",
    )
    serve.add_argument(
        "--twilio-auth-token",
        default=os.environ.get("TWILIO_AUTH_TOKEN"),
        help="verify X-Twilio-Signature on /twilio upgrades with this account auth token (or TWILIO_AUTH_TOKEN)",
    )
    serve.add_argument(
        "--telnyx-outbound-codec",
        choices=["PCMU", "PCMA"],
        default="PCMU",
        help="the codec Telnyx plays our audio in: set it as the stream's stream_bidirectional_codec "
        "(TeXML bidirectionalCodec), whose default is PCMU whatever the caller's codec (default: %(default)s)",
    )
    serve.add_argument(
        "--allow-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="a web page origin (https://app.example.com) that may open call websockets; repeatable "
        "(the server's own page always may; clients with no Origin header, carriers and SDKs, are unaffected)",
    )
    serve.add_argument(
        "--public-url",
        default=_env("PUBLIC_URL"),
        help="the origin carriers connect to behind a proxy, e.g. https://voice.example.com (signatures use it)",
    )
    serve.add_argument(
        "--state-url",
        default=_env("STATE_URL"),
        help="where calls' conversations are kept for re-attach: memory (default) or redis://host:port/db, "
        "shared by every replica (or FIRSTLINE_STATE_URL)",
    )
    serve.add_argument(
        "--state-ttl-s",
        type=float,
        default=ServerConfig.state_ttl_s,
        help="a call's stored conversation expires this long after its last turn",
    )
    serve.add_argument(
        "--carrier-secret",
        default=_env("CARRIER_SECRET"),
        help="require custom parameter firstline_secret=SECRET when a carrier stream starts "
        "(or FIRSTLINE_CARRIER_SECRET)",
    )
    serve.add_argument(
        "--audio-rate-multiple",
        type=float,
        default=CallLimits.audio_rate_multiple,
        help="a call may send audio at most this many times faster than real time (0: no limit)",
    )
    serve.add_argument(
        "--audio-rate-window-s",
        type=float,
        default=CallLimits.audio_rate_window_s,
        help="the audio rate is averaged over this many seconds",
    )
    serve.add_argument(
        "--audio-rate-sustained-multiple",
        type=float,
        default=CallLimits.audio_rate_sustained_multiple,
        help="and at most this many times real time sustained (0: no sustained limit)",
    )
    serve.add_argument(
        "--audio-rate-sustained-window-s",
        type=float,
        default=CallLimits.audio_rate_sustained_window_s,
        help="the sustained audio rate is averaged over this many seconds",
    )
    serve.add_argument(
        "--low-priority-multiple",
        type=float,
        default=CallLimits.low_priority_multiple,
        help="a call sending audio faster than this many times real time is served after the others (0: off)",
    )
    serve.add_argument(
        "--abuse-cooldown-s",
        type=float,
        default=CallLimits.abuse_cooldown_s,
        help="after a call is ended for an audio flood or not reading, refuse new calls from its "
        "address for this long (HTTP 429; 0: off; --per-address-exempt addresses are exempt)",
    )
    serve.add_argument(
        "--allow-custom-prompt",
        action="store_true",
        help="let carriers' custom parameters set the call's system_prompt (off: anyone who can call could)",
    )
    serve.add_argument(
        "--no-demo",
        action="store_true",
        default=(_env("DEMO_PAGE", "1") or "1").strip().lower() in ("0", "false", "no", "off"),
        help="don't serve the browser call page at / (or FIRSTLINE_DEMO_PAGE=0); for production",
    )
    serve.add_argument(
        "--otel-endpoint",
        default=None,
        help="send a trace per turn to this OTLP/HTTP URL, e.g. http://collector:4318/v1/traces "
        "(also on when OTEL_EXPORTER_OTLP_ENDPOINT is set; needs the otel extra)",
    )
    return parser


def _pad_windows(text: str) -> tuple[int, ...]:
    """Parse "5,10,20,30" into (5, 10, 20, 30): whole seconds within Whisper's 30 s."""
    try:
        windows = tuple(sorted({int(part) for part in text.split(",") if part.strip()}))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: whole seconds, comma-separated (e.g. 10,20,30)") from None
    if not windows or windows[0] < 1 or windows[-1] > 30:
        raise argparse.ArgumentTypeError(f"{text!r}: each window between 1 and 30 s (Whisper's longest)")
    return windows


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    try:
        sampling = sampling_from_args(args, max_tokens=args.max_tokens)
    except ValueError as exc:  # a sampling flag out of range, named in the message
        raise SystemExit(f"firstline: {exc}") from None
    llm = LLMConfig(
        engine=args.engine,
        model=args.llm_model,
        embedded_quant=None if args.llm_embedded_quant == "shipped" else args.llm_embedded_quant,
        device=args.llm_device,
        threads=args.llm_threads if args.llm_threads > 0 else threads_for(os.cpu_count() or 2),
        thread_poll=min(100, max(0, args.llm_thread_poll)),
        parallel=args.llm_parallel
        if args.llm_parallel > 0
        else slots_for(args.engine, args.llm_device, args.max_calls),
        replicas=args.llm_replicas
        if args.llm_replicas > 0
        else replicas_for(args.engine, args.llm_device, os.cpu_count() or 2),
        prompt_cache_ram_mib=args.llm_prompt_cache_mib,
        slot_choice=args.llm_slot_choice,
        replica_home_slack=args.llm_home_slack,
        sampling=sampling,
        speculation=SpeculationConfig(
            method=args.speculation, num_tokens=args.speculative_tokens, draft_model=args.draft_model
        ),
    )
    if args.system_prompt:
        llm.system_prompt = args.system_prompt
    llm.example_turns = args.example_turns
    llm.enforce_eager = args.llm_enforce_eager
    llm.isolation = args.engine_isolation
    llm.remote_urls = list(args.remote_url)
    llm.secondary_urls = list(args.secondary_url)
    llm.remote_model = args.remote_model
    llm.first_token_timeout_s = args.llm_first_token_timeout_s
    try:
        check_replicas(llm.engine, llm.replicas)
    except ValueError as exc:
        raise SystemExit(f"firstline: --llm-replicas {exc}") from None
    if llm.replica_home_slack < 0:
        raise SystemExit("firstline: --llm-home-slack must be 0 (always the least busy copy) or more")
    if llm.engine == "remote" and not llm.remote_urls:
        raise SystemExit("firstline: --engine remote needs at least one --remote-url")
    sentence_end_share = min(1.0, max(0.0, args.whisper_sentence_end_threshold))
    asr = ASRConfig(
        model=args.asr_model,
        device=args.asr_device,
        compute_type=args.asr_compute_type,
        threads=args.asr_threads if args.asr_threads > 0 else decoder_threads_for(os.cpu_count() or 2),
        nice=max(0, min(19, args.asr_nice)),
        finals_nice=None if args.asr_finals_nice is None else max(0, min(19, args.asr_finals_nice)),
        decoder_process=args.asr_process,
        decode_timeout_s=max(0.0, args.asr_decode_timeout_s),
        endpoint_silence_s=args.endpoint_silence_ms / 1000.0,
        partials=not args.no_partials,
        preemptive=not args.no_preemptive,
        adaptive_endpoint=not args.fixed_endpoint,
        vad_end_margin=args.vad_end_margin,
        endpoint_sentence_words=args.endpoint_sentence_words,
        end_of_turn=args.end_of_turn,
        resume_grace_s=max(0.0, args.resume_grace_s),
        llm_sentence_end_threshold=min(1.0, max(0.0, args.llm_sentence_end_threshold)),
        whisper_sentence_end_threshold=sentence_end_share,
        whisper_hold_threshold=min(sentence_end_share, max(0.0, args.whisper_hold_threshold)),
        endpoint_sure_s=max(0, args.endpoint_sure_ms) / 1000.0,
        whisper_sure_threshold=min(1.0, max(0.0, args.whisper_sure_threshold)),
        endpoint_answer_s=max(0, args.endpoint_answer_ms) / 1000.0,
        smart_turn_model=args.smart_turn_model,
        scheduler=args.asr_scheduler,
        batch_size=max(0, args.asr_batch_size),
        batch_wait_ms=max(0.0, args.asr_batch_wait_ms),
        pad_windows_s=args.asr_pad_windows,
        no_speech_threshold=None if args.asr_no_speech_threshold < 0 else args.asr_no_speech_threshold,
        no_speech_logprob=args.asr_no_speech_logprob,
        partial_budget=None if args.asr_partial_budget is None else max(0.0, args.asr_partial_budget),
        partials_behind_finals=args.asr_partials_behind_finals,
    )
    if asr.adaptive_endpoint and asr.end_of_turn in SMART_TURN_POLICIES:
        # Load Smart Turn now: a missing model is a startup error, not a
        # failure at the first caller's first pause.
        from asr.end_of_turn import SmartTurnMissing, shared_smart_turn

        try:
            shared_smart_turn(asr.smart_turn_model)
        except SmartTurnMissing as exc:
            raise SystemExit(f"firstline: --end-of-turn {asr.end_of_turn}: {exc}") from None
    llm.incremental_prefill = not args.no_incremental_prefill
    llm.score_sentence_ends = asr.adaptive_endpoint and asr.end_of_turn in LLM_END_OF_TURN_POLICIES
    config = ServerConfig(host=args.host, port=args.port, max_calls=args.max_calls, asr=asr, llm=llm)
    config.audiosocket_port = args.audiosocket_port
    config.limits.idle_timeout_s = args.idle_timeout_s
    config.limits.max_call_s = args.max_call_s
    config.limits.send_timeout_s = args.send_timeout_s
    config.limits.drain_timeout_s = args.drain_timeout_s
    config.admission.ttfs_target_ms = args.ttfs_target_ms or None
    config.admission.max_asr_queue = args.max_asr_queue or None
    config.admission.llm_down_grace_s = None if args.llm_down_grace_s < 0 else args.llm_down_grace_s
    config.auth_token = args.auth_token or None
    config.max_calls_per_address = max(0, args.max_calls_per_address)
    config.call_rate_per_address = max(0.0, args.call_rate_per_address)
    if args.per_address_exempt is not None:
        config.per_address_exempt = list(args.per_address_exempt)
    if args.trusted_proxy is not None:
        config.trusted_proxies = list(args.trusted_proxy)
    if args.audiosocket_host is not None:
        config.audiosocket_host = args.audiosocket_host
    config.audiosocket_allow = list(args.audiosocket_allow)
    config.twilio_auth_token = args.twilio_auth_token or None
    config.telnyx_outbound_codec = args.telnyx_outbound_codec
    config.allowed_origins = [o.rstrip("/").lower() for o in args.allow_origin]
    try:
        config.public_url = check_public_url(args.public_url) if args.public_url else None
    except ValueError as exc:
        raise SystemExit(f"firstline: {exc}") from None
    if args.state_url and args.state_url != "memory" and not args.state_url.startswith(STORE_SCHEMES):
        raise SystemExit(f"firstline: --state-url {args.state_url!r}: use memory or redis://host:port/db")
    config.state_url = args.state_url
    config.state_ttl_s = max(1.0, args.state_ttl_s)
    config.carrier_secret = args.carrier_secret or None
    config.allow_custom_prompt = args.allow_custom_prompt
    config.limits.audio_rate_multiple = max(0.0, args.audio_rate_multiple)
    config.limits.audio_rate_window_s = max(0.1, args.audio_rate_window_s)
    config.limits.low_priority_multiple = max(0.0, args.low_priority_multiple)
    config.limits.audio_rate_sustained_multiple = max(0.0, args.audio_rate_sustained_multiple)
    config.limits.audio_rate_sustained_window_s = max(1.0, args.audio_rate_sustained_window_s)
    config.limits.abuse_cooldown_s = max(0.0, args.abuse_cooldown_s)
    config.otel_endpoint = args.otel_endpoint
    config.demo_page = not args.no_demo
    config.greeting = args.greeting or None
    if args.keypad_answer_ms < 0:
        raise SystemExit("firstline: --keypad-answer-ms must be 0 (off) or more")
    config.keypad_answer_s = args.keypad_answer_ms / 1000
    config.go_on_after_noise = not args.no_go_on_after_noise
    config.first_sentences_first = args.first_sentences_first
    config.hold_for_resume = args.hold_for_resume
    if args.first_sentence_lanes is not None:
        if args.first_sentence_lanes < 0:
            raise SystemExit("firstline: --first-sentence-lanes must be 0 (no limit) or more")
        config.first_sentence_lanes = args.first_sentence_lanes
    config.greeting_instructions = args.greeting_instructions or None
    if args.first_clause_words < 0:
        raise SystemExit("firstline: --first-clause-words must be 0 (whole sentences only) or more")
    config.first_clause_words = args.first_clause_words
    try:
        config.reply = ReplyPolicy(
            max_sentences=args.reply_max_sentences,
            loop_guard=not args.no_loop_guard,
            fallback=args.reply_fallback,
            failure_line=args.reply_failure_line,
        )
    except ValueError as exc:
        raise SystemExit(f"firstline: {exc}") from None
    otel_env = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    config.tracing = bool(args.otel_endpoint or any(os.environ.get(name) for name in otel_env))
    return config


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Secrets are scrubbed from every record by value (websockets logs headers at debug).
    configure_logging(
        getattr(args, "log_level", "INFO"),
        getattr(args, "log_format", "text"),
        [getattr(args, name, "") or "" for name in ("auth_token", "twilio_auth_token", "carrier_secret")]
        + [os.environ.get(REMOTE_KEY_ENV, "")],
    )
    if args.command == "serve":
        from voice.server.app import VoiceServer

        try:
            import uvloop

            uvloop.install()
        except ImportError:
            pass
        files = raise_open_files_limit()
        log.debug("open files limit: %d", files)
        server = VoiceServer(config_from_args(args))
        asyncio.run(server.serve_forever())
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
