"""An lm-eval model over a served model: the black-box side of the ``lm_eval`` fitness.

``ServedLM`` answers lm-eval's requests with ``ServedModel.loglikelihood`` and ``generate``, which
send them as lm-eval's ``local-completions`` model does (one ``/v1/completions`` request each:
``echo`` with ``logprobs`` for a log-likelihood, a greedy completion with ``stop`` strings for a
generation). lm-eval calls it from a worker thread; the requests run concurrently on the event
loop that owns the API client. Imported only when a black-box ``lm_eval`` fitness runs, since
defining the class imports lm-eval.
"""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Sequence

from lm_eval.api.model import LM

from evomerge.errors import ConfigError
from evomerge.fitness.blackbox import ServedModel

DEFAULT_MAX_GEN_TOKS = 256
"""lm-eval's default ``max_gen_toks`` when a task's ``generation_kwargs`` name none."""


class ServedLM(LM):
    """lm-eval's ``loglikelihood`` and ``generate_until`` (greedy) through a served model."""

    def __init__(self, model: ServedModel, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self.model = model
        self.loop = loop

    def _all(self, calls: Sequence[Awaitable[Any]]) -> list[Any]:
        async def gather() -> list[Any]:
            return list(await asyncio.gather(*calls))

        return asyncio.run_coroutine_threadsafe(gather(), self.loop).result()

    def loglikelihood(self, requests: list[Any]) -> list[tuple[float, bool]]:
        answers = self._all([self.model.loglikelihood(*r.args) for r in requests])
        return [(a.logprob, a.is_greedy) for a in answers]

    def generate_until(self, requests: list[Any]) -> list[str]:
        calls = []
        for r in requests:
            context, gen_kwargs = r.args
            if gen_kwargs.get("do_sample"):
                raise ConfigError("fitness 'lm_eval' in black-box runs decodes greedily; set do_sample: false in the task")
            until = gen_kwargs.get("until", [])
            stop = [until] if isinstance(until, str) else list(until)
            calls.append(self.model.generate(context, max_tokens=gen_kwargs.get("max_gen_toks", DEFAULT_MAX_GEN_TOKS), stop=stop))
        return self._all(calls)

    def loglikelihood_rolling(self, requests: list[Any]) -> list[float]:
        raise ConfigError("fitness 'lm_eval' in black-box runs scores loglikelihood, multiple_choice and generate_until tasks")
