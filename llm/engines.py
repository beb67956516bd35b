"""Building an engine from :class:`~llm.config.LLMConfig`.

``build_local_engine`` makes an engine that runs in this process (llama.cpp or
vLLM). ``build_engine`` honours the fault-tolerance settings on top: a remote
engine or replica pool (``engine="remote"``), or a local engine run out of
process under a supervisor (``isolation="process"``) with an optional
secondary to fail over to.
"""

from __future__ import annotations

from llm.base import LLMEngine
from llm.config import LLMConfig, check_replicas


def build_local_engine(config: LLMConfig) -> LLMEngine:
    try:
        check_replicas(config.engine, config.replicas)
    except ValueError as exc:
        raise ValueError(f"LLM replicas {exc}") from None
    if config.engine == "llamacpp":
        from llm.llamacpp_engine import LlamaCppEngine

        if config.replicas == 1:
            return LlamaCppEngine(config)
        from llm.replicas import ReplicaSet

        return ReplicaSet([LlamaCppEngine(config) for _ in range(config.replicas)], config.replica_home_slack)
    if config.engine == "vllm":
        from llm.vllm_engine import VLLMEngine

        return VLLMEngine(config)
    raise ValueError(f"unknown local LLM engine {config.engine!r} (use llamacpp or vllm)")


def build_remote_engine(urls: list[str], config: LLMConfig, name: str = "remote") -> LLMEngine:
    """One URL: a :class:`RemoteEngine`; several: a :class:`RemotePool`."""
    from llm.remote_engine import RemoteEngine, RemotePool

    if not urls:
        raise ValueError("a remote engine needs at least one URL")
    if len(urls) == 1:
        return RemoteEngine.from_config(urls[0], config, watch_health=True)
    return RemotePool.from_config(urls, config, name=name)


def build_engine(config: LLMConfig) -> LLMEngine:
    if config.engine == "remote":
        return build_remote_engine(config.remote_urls, config)
    if config.isolation == "inprocess":
        engine = build_local_engine(config)
        # In the voice process nothing else bounds a request (the supervised
        # child's client, RemoteEngine, has its HTTP deadline).
        for local in getattr(engine, "copies", [engine]):
            local.stream_limits = (config.first_token_timeout_s, config.stall_timeout_s)
        return engine
    if config.isolation == "process":
        from llm.supervisor import SupervisedEngine

        secondary = build_remote_engine(config.secondary_urls, config, "secondary") if config.secondary_urls else None
        return SupervisedEngine(config, secondary=secondary)
    raise ValueError(f"unknown engine isolation {config.isolation!r} (use process or inprocess)")
