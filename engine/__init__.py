"""loraplex engine: model forward over paged KV, runner, sampler, the step loop.

Public API: `LLM` (offline generation), `Engine` (step-level), `EngineConfig`, `SamplingParams`.
Imported lazily so that `import engine.loader` stays light.
"""

from __future__ import annotations

__all__ = ["LLM", "Engine", "EngineConfig", "SamplingParams"]


def __getattr__(name: str):
    if name == "LLM":
        from engine.llm import LLM

        return LLM
    if name == "Engine":
        from engine.engine import Engine

        return Engine
    if name == "EngineConfig":
        from engine.config import EngineConfig

        return EngineConfig
    if name == "SamplingParams":
        from scheduler.sequence import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
