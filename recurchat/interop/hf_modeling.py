"""The transformers side of an exported model: RecurchatConfig, RecurchatForCausalLM and its recursion-aware cache.

`recurchat export hf` writes this module into the exported folder as `modeling_recurchat.py`, after recurchat's own
layers, recursive model, KV cache and exit criteria (interop/hf_export.py concatenates the sources and drops the
`from recurchat…` imports), so the folder loads with `trust_remote_code=True` and no recurchat installed, and
computes exactly what recurchat computes. Per call:

    model(ids, num_recur=8)                                     # logits at depth 8 (default r̄), no cache
    model.generate(ids, max_new_tokens=40, num_recur=8)         # cached decoding at depth 8
    model.generate(ids, max_new_tokens=40, exit="kl:1e-3", max_recur=16, kv="last")   # per-token early exit

Batches must be unpadded (equal-length prompts): positions are the token's index, as in recurchat. The cached
passes (_chunk, _decode_with_exit) are a smaller restatement of infer/engine.py's: exporting the engine itself would
pull the continuous batcher, depth plans, sampling and hardware probes into the folder; the parity tests hold the
two to the same numbers.
Exercised by `pytest tests/test_export_hf.py`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.utils import ModelOutput

from recurchat.config import ModelConfig
from recurchat.infer.exit import ExitCriterion, ExitTracker
from recurchat.infer.kv_cache import KVCache
from recurchat.model.layers import rotary_tables
from recurchat.model.recurrent import RecurrentLM

# ModelConfig's own defaults (the exported file carries recurchat/config.py, so they cannot drift apart)
RECURCHAT_FIELDS = {f.name: f.default for f in dataclasses.fields(ModelConfig)}


class RecurchatConfig(PretrainedConfig):
    model_type = "recurchat"
    # what recurchat's model derives from its fields, computed as ModelConfig computes it
    mlp_width, mlp_params = ModelConfig.mlp_width, ModelConfig.mlp_params
    recursive, effective_layers = ModelConfig.recursive, ModelConfig.effective_layers

    def __init__(self, **kwargs):
        for name, default in RECURCHAT_FIELDS.items():
            setattr(self, name, kwargs.pop(name, default))
        super().__init__(**kwargs)

    def validate(self) -> "RecurchatConfig":  # what recurchat's model asks of its config
        return self


@dataclass
class RecurchatOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    cache: object | None = None  # a RecurchatCache (handed on by _update_model_kwargs_for_generation)
    depths: torch.Tensor | None = None  # recursions each new token ran


class RecurchatCache:
    """recurchat's KV cache (`full`: a slot per iteration, `last`: one per shared layer) for one generate() call,
    sized to the context; `length` tokens of every row are in it."""

    def __init__(self, config: RecurchatConfig, batch: int, kv: str, depth: int, device, dtype):
        self.kv = KVCache(config, kv, batch, config.seq_len, depth, device, dtype)
        self.depth, self.length = depth, 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length


class RecurchatForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = RecurchatConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"

    def __init__(self, config: RecurchatConfig):
        super().__init__(config)
        self.model = RecurrentLM(config)
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:  # the cache is ours (RecurchatCache), made in forward
        return False

    def _init_weights(self, module) -> None:  # weights come from model.safetensors, rotary tables from the config
        pass

    def _rope_ready(self) -> None:
        """Rebuild the rotary tables once: they are non-persistent buffers, which from_pretrained leaves
        uninitialised (it builds the model without computing them, then loads only the saved tensors)."""
        m = self.model
        if getattr(self, "_rope_device", None) != m.embed.weight.device:
            c = self.config
            cos, sin = rotary_tables(c.seq_len, c.d_model // c.n_head, c.rope_base, c.rope_convention)
            m.cos, m.sin = cos.to(m.embed.weight.device), sin.to(m.embed.weight.device)
            self._rope_device = m.embed.weight.device

    def forward(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None, cache=None,
                past_key_values=None, use_cache: bool | None = None, labels: torch.LongTensor | None = None,
                num_recur: int | None = None, exit: str | None = None, max_recur: int | None = None,
                kv: str = "full", **kwargs) -> RecurchatOutput:
        self._rope_ready()
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            raise ValueError("recurchat models generate unpadded batches: give prompts of equal length")
        cache = cache if cache is not None else past_key_values
        if cache is None and not use_cache:
            if exit:
                raise ValueError("an exit criterion decides per token during cached decoding: use generate()")
            logits = self.model(input_ids, num_recur=num_recur)
            loss = None if labels is None else F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
            return RecurchatOutput(loss=loss, logits=logits)
        plan = self._plan(num_recur, exit, max_recur)
        if cache is None:
            cache = RecurchatCache(self.config, input_ids.size(0), kv, max(plan[1], plan[2]), input_ids.device,
                                   self.model.embed.weight.dtype)
        if exit and cache.length:
            logits, depths = self._decode_with_exit(input_ids, cache, plan)
        else:
            logits, depths = self._chunk(input_ids, cache, plan[2] if exit else plan[1])
        return RecurchatOutput(logits=logits, cache=cache, depths=depths)

    def _plan(self, num_recur, exit, max_recur) -> tuple[ExitCriterion | None, int, int]:
        """(criterion or None, deepest iteration, depth of the prompt's prefill)."""
        c = self.config
        if exit:
            deepest = int(max_recur or c.r_max)
            return ExitCriterion.parse(exit), deepest, min(c.mean_recur, deepest)
        r = int(num_recur or c.mean_recur)
        return None, r, r

    def _chunk(self, input_ids, cache: RecurchatCache, r: int):
        """T new tokens per row after the `cache.length` cached ones, at fixed depth r (recurchat's chunk pass)."""
        m, B, T = self.model, input_ids.size(0), input_ids.size(1)
        start = cache.length
        cos, sin = m.rope(start, T)
        rows = torch.arange(B, device=input_ids.device)
        view = cache.kv.rows(rows, None, start=torch.full((B,), start, device=input_ids.device) if start else 0,
                             chunk=T)
        x = m.run_prelude(input_ids, cos, sin, cache.kv.prelude(view))
        if m.recur:
            x = m.loop(x, m.initial_state(x), cos, sin, r, kv=lambda i: cache.kv.recur(i, view))
            for t in ([None] if start == 0 else range(start, start + T)):  # deeper iterations read iteration r
                cache.kv.fill_forward(rows, None if t is None else torch.full((B,), t, device=input_ids.device), r,
                                      cache.depth)
        cache.length += T
        logits = m.head(m.run_coda(x, cos, sin, cache.kv.coda(view)))
        return logits, torch.full((B, T), r if m.recur else 0, device=input_ids.device)

    def _decode_with_exit(self, input_ids, cache: RecurchatCache, plan):
        """One new token per row; each row leaves the iteration loop when the criterion says so (recurchat's
        per-row exit: the stopped row's K/V is filled forward, then the coda and head run on its state)."""
        crit, deepest, _ = plan
        m, B, pos = self.model, input_ids.size(0), cache.length
        if input_ids.size(1) != 1:
            raise ValueError("decoding under an exit criterion feeds one token per step")
        cos, sin = m.rope(pos, 1)
        positions = torch.full((B,), pos, device=input_ids.device)
        view = cache.kv.rows(torch.arange(B, device=input_ids.device), positions)
        e = m.run_prelude(input_ids, cos, sin, cache.kv.prelude(view))
        s, final = m.initial_state(e), torch.empty_like(e)
        active, depths = torch.arange(B, device=input_ids.device), torch.full((B,), deepest, device=e.device)
        tracker = ExitTracker(crit, B, e.device, None, s[:, -1])

        def active_view():
            return cache.kv.rows(active, positions[active])

        def after(step: int, s: torch.Tensor):  # the criterion; stopped rows are filled forward and leave
            nonlocal active
            logits = None
            if crit.needs_logits:
                logits = m.head(m.run_coda(s, cos, sin, cache.kv.coda(active_view())))[:, -1]
            done = tracker.update(step, s[:, -1], logits) | (step >= deepest)
            if not bool(done.any()):
                return None
            stopped = active[done]
            final[stopped], depths[stopped] = s[done], step
            cache.kv.fill_forward(stopped, positions[stopped], step, deepest)
            active = active[~done]
            tracker.keep(~done)
            return (e[active], s[~done], cos, sin) if active.numel() else ()

        m.loop(e, s, cos, sin, deepest, kv=lambda i: cache.kv.recur(i, active_view()), after=after)
        cache.length += 1
        return m.head(m.run_coda(final, cos, sin, cache.kv.coda(view))), depths[:, None]

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs: dict, *args, **kwargs) -> dict:
        """transformers' bookkeeping, then our cache under the name our own prepare_inputs_for_generation reads
        (transformers has called it past_key_values and cache in turn)."""
        model_kwargs = super()._update_model_kwargs_for_generation(outputs, model_kwargs, *args, **kwargs)
        model_kwargs["cache"] = outputs.cache
        return model_kwargs

    def prepare_inputs_for_generation(self, input_ids, cache=None, past_key_values=None, attention_mask=None,
                                      **kwargs) -> dict:
        """Feed what the cache does not hold yet; pass the recursion settings of this generate() call through."""
        cache = cache if cache is not None else past_key_values
        if cache is not None and cache.length:
            input_ids = input_ids[:, cache.length:]
        inputs = {"input_ids": input_ids, "cache": cache, "use_cache": True, "attention_mask": attention_mask}
        inputs.update({k: kwargs[k] for k in ("num_recur", "exit", "max_recur", "kv") if k in kwargs})
        return inputs
