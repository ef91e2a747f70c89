"""One jitted rollout for every method: prefill -> latent steps -> separator -> answer.

CoLaR inference (``latent_generate`` of the reference) is, per row:

1. prefill the left-padded prompt ``question (Thinking speed: c)###``;
2. latent loop: the latent head maps the last hidden state to a Gaussian over
   ``embedding / embed_std``; a sample times ``embed_std`` is fed as the next input
   embedding; the LM head's distribution AFTER feeding that latent is sampled and the
   row stops thinking when the draw is the separator id. So the first decision comes
   after the first latent (a row always has >= 1 latent) and a row that draws the
   separator right after its k-th latent has exactly k latents. Finished rows are fed
   with mask 0: their cache index, positions and hidden state freeze;
3. the separator token is appended and the answer is sampled (temperature, top-k, top-p, or
   greedy) until EOS -- here CONTINUING FROM THE SAME KV CACHE (the reference re-runs
   the whole prefix through ``generate``; the result is the same distribution).

The prefill is the decoder's own call; the latent and answer loops run the same layers
through :class:`_Steps` on a :class:`LayerCache` (unrolled, one cache buffer per layer,
laid out for the decode attention), which is what makes a step cheap on CPU.

The end-of-thinking check compares the sampled token ID with ``separator_id`` (the
reference does the same: ``convert_tokens_to_ids("###")``), so the tokenizer must map
the separator to one id -- ``colar_jax.data.prompts.separator_id`` enforces that.

The same code path serves every method through ``RolloutConfig.latent_mode``:
  * ``"sampled"`` -- CoLaR (above);
  * ``"hidden"``  -- Coconut / Distill: exactly ``max_latent_steps`` latents, each the
    last hidden state (optionally through a projection), no stop decision; unlike the
    reference (whose fixed-length loop drops the KV cache) latents attend to the prompt;
  * ``"none"``    -- CoT / No-CoT / iCoT: no latents, no separator appended, plain token
    decoding from the prompt.

RNG: the caller gives one key and a row id per row (default: position in the batch);
row key = ``fold_in(rng, row_id)``, split into a latent stream and an answer stream, and
step t uses ``fold_in(stream, t)``. A row's draws therefore depend only on its own id,
prompt and step -- not on its batch neighbours, their padding or batch-shape bucketing
(pass dataset indices as row ids to make evaluation independent of batching).

Log-probs returned (what GRPO needs, matching the reference's ``get_logprobs``): per
latent the Gaussian log-density of ``latent / embed_std`` at temperature 1, averaged over
dims; per answer token ``log_softmax(logits)[token]`` of the untempered LM head; and
``eot_logprob``, log p(separator) from the logits after the LAST latent (the reference
prepends it to the answer log-probs; also reported for rows cut at ``max_latent_steps``,
flagged by ``thought_done == False``). :func:`score_rollout` recomputes all of them with
one teacher-forced forward (differentiable; the RL loss uses it).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from colar_jax import config as cfglib
from colar_jax.decode.sampling import sample_tokens, token_logprobs
from colar_jax.model import (
  DecoderOutput,
  KVCache,
  apply_rope,
  positions_from_mask,
  rope_inv_freq,
)

LATENT_MODES = ("sampled", "hidden", "none")
_DEFAULTS = cfglib.Rollout()  # the schema is the one source of defaults
DEFAULT_BATCH_BUCKETS: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

# Incremented at TRACE time inside ``rollout_fn`` (Python side effect), keyed by
# latent mode: a retrace == a new compilation, so tests and logs can assert
# "one compilation per bucket".
TRACE_COUNTS: collections.Counter[str] = collections.Counter()


def compilation_count(mode: str | None = None) -> int:
  """Number of times the rollout has been traced (== compiled), optionally per mode."""
  return sum(TRACE_COUNTS.values()) if mode is None else TRACE_COUNTS[mode]


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
  """Static settings of a rollout (hashable: a jit static argument).

  Changing any field compiles a new program; keep them constant per run. Runs build it
  from their ``rollout`` config section (``train.run.rollout_config``); the defaults here
  are those of ``config.Rollout``.
  ``projection`` (hidden mode) is a model attribute name (``"latent_proj"``) or a
  module-level function ``f(model, hidden) -> embedding`` (a lambda re-created per
  call would hash differently and recompile every time).
  """

  separator_id: int
  eos_id: int  # -1: never stop early
  pad_id: int = 0
  latent_mode: str = "sampled"
  max_latent_steps: int = _DEFAULTS.max_latent_steps
  latent_temperature: float = _DEFAULTS.latent_temperature
  eot_temperature: float = (
    _DEFAULTS.eot_temperature
  )  # temperature of the end-of-thinking draw (0 = argmax)
  embed_std: float = 1.0
  projection: str | Callable[..., jax.Array] | None = None
  max_new_tokens: int = _DEFAULTS.max_new_tokens
  temperature: float = _DEFAULTS.temperature
  top_p: float = _DEFAULTS.top_p
  top_k: int = _DEFAULTS.top_k  # answer tokens: top-k before top-p (0 = off), as HF
  greedy: bool = _DEFAULTS.greedy

  def __post_init__(self) -> None:
    if self.latent_mode not in LATENT_MODES:
      raise ValueError(f"latent_mode {self.latent_mode!r} not in {LATENT_MODES}")
    if self.max_latent_steps < 0 or self.max_new_tokens < 1:
      raise ValueError("need max_latent_steps >= 0 and max_new_tokens >= 1")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
    if self.top_k < 0:
      raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
    if self.embed_std <= 0:
      raise ValueError(f"embed_std must be > 0, got {self.embed_std}")

  def replace(self, **kw: Any) -> RolloutConfig:
    return dataclasses.replace(self, **kw)

  @property
  def num_latents(self) -> int:
    """Size of the latent buffers (0 in "none" mode)."""
    return 0 if self.latent_mode == "none" else self.max_latent_steps

  @property
  def append_separator(self) -> bool:
    return self.latent_mode != "none"

  def cache_length(self, prompt_len: int) -> int:
    return prompt_len + self.num_latents + self.max_new_tokens + 1


@flax.struct.dataclass
class RolloutOutput:
  """Everything a rollout produced; leading axis = batch row.

  Arrays past a row's end are padding: ``answer_ids`` holds ``pad_id``, latents and
  log-probs hold 0 where the corresponding mask is False.
  """

  answer_ids: jax.Array  # [B, T] int32, sampled after the separator; includes EOS
  answer_mask: jax.Array  # [B, T] bool
  answer_logprobs: jax.Array  # [B, T] f32, log p(token) of the untempered LM head
  answer_done: jax.Array  # [B] bool, emitted EOS within max_new_tokens
  num_latents: jax.Array  # [B] int32 latent steps taken (= latent_mask.sum(-1))
  latents: jax.Array  # [B, L, D] f32, the input embeddings fed (already * embed_std)
  latent_mask: jax.Array  # [B, L] bool
  latent_logprobs: jax.Array  # [B, L] f32, mean-over-dims Gaussian log-density
  eot_logprob: jax.Array  # [B] f32, log p(separator) after the last latent
  thought_done: jax.Array  # [B] bool, the row drew the separator itself


# ----------------------------------------------------------------------------
# Traced pieces
# ----------------------------------------------------------------------------
def _lm(model: Any) -> Any:
  return model.lm if hasattr(model, "lm") else model


def _project(model: Any, hidden: jax.Array, projection: Any) -> jax.Array:
  if projection is None:
    return hidden
  if isinstance(projection, str):
    return getattr(model, projection)(hidden)
  return projection(model, hidden)


def _row_fold(keys: jax.Array, data: jax.Array | int) -> jax.Array:
  return jax.vmap(lambda k: jax.random.fold_in(k, data))(keys)


@flax.struct.dataclass
class LayerCache:
  """The decode loops' KV cache: per layer, keys ``[B, Hkv, D, S]`` and values
  ``[B, Hkv, S, D]``.

  Versus the decoder's :class:`KVCache` (``[L, B, S, Hkv, D]``, sliced per layer by a
  scan): each layer's buffers are their own loop carries, updated in place where the new
  token goes, and each is laid out so that one decode step's attention is a
  multiply-and-sum along its minor axis (no transposes, no dot). With the decoder's
  layout, every step copied each layer's cache out of the stack, transposed it for both
  attention dots and wrote a fresh stack (CPU profile in BUILD_NOTES).
  """

  k: tuple[jax.Array, ...]  # L x [B, Hkv, D, S]
  v: tuple[jax.Array, ...]  # L x [B, Hkv, S, D]
  mask: jax.Array  # [B, S] bool
  index: jax.Array  # [B] int32, the next slot of each row

  @classmethod
  def of(cls, cache: KVCache, length: int) -> LayerCache:
    """``cache`` (the prefill's) re-laid out and extended with empty slots to ``length``."""
    grow = length - cache.length

    def pad(x):
      return jnp.pad(x, ((0, 0), (0, grow)) + ((0, 0),) * (x.ndim - 2))

    return cls(
      k=tuple(jnp.transpose(pad(x), (0, 2, 3, 1)) for x in cache.k),
      v=tuple(jnp.transpose(pad(x), (0, 2, 1, 3)) for x in cache.v),
      mask=pad(cache.mask),
      index=cache.index,
    )


def _write_rows(buf: jax.Array, new: jax.Array, index: jax.Array, axis: int) -> jax.Array:
  """buf [B, ...] <- new [B, ...] at per-row offsets ``index`` [B] along ``axis`` of a row
  (as the decoder's cache writes: ``dynamic_update_slice``, so offsets clamp)."""

  def one(b, n, i):
    start = tuple(i if a == axis else 0 for a in range(b.ndim))
    return jax.lax.dynamic_update_slice(b, n.astype(b.dtype), start)

  return jax.vmap(one)(buf, new, index)


class _Steps:
  """``lm(..., cache=...)`` for the decode loops, on a :class:`LayerCache`.

  The layers are unrolled, each with its weights sliced out of the decoder's stack once
  per rollout (the scan sliced them every step). Norms, projections, RoPE and MLP are the
  decoder's own modules; only the attention core is restated here for the cache layout,
  with ``jax.nn.dot_product_attention``'s XLA semantics (f32 logits and softmax, masked
  logits at -0.7 * float32 max, probabilities rounded to the cache dtype). Parity with
  the decoder's cached call is tested.
  """

  def __init__(self, lm: Any):
    self.lm = lm
    graphdef, state = nnx.split(lm.layers)
    self.blocks = tuple(
      nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], state))
      for i in range(lm.cfg.num_layers)
    )

  def _block(self, blk, x, positions, inv_freq, allowed, ck, cv, index):
    cfg = self.lm.cfg
    b, t, _ = x.shape
    kv, hd = cfg.num_kv_heads, cfg.head_dim
    att = blk.attn
    hx = blk.input_norm(x)
    q = apply_rope(att.q_proj(hx).reshape(b, t, cfg.num_heads, hd), positions, inv_freq)
    k = apply_rope(att.k_proj(hx).reshape(b, t, kv, hd), positions, inv_freq)
    v = att.v_proj(hx).reshape(b, t, kv, hd)
    ck = _write_rows(ck, jnp.transpose(k, (0, 2, 3, 1)), index, axis=2)  # [B, Hkv, D, T]
    cv = _write_rows(cv, jnp.transpose(v, (0, 2, 1, 3)), index, axis=1)  # [B, Hkv, T, D]
    f32 = jnp.float32
    # Query heads grouped per KV head: [B, Hkv, G, T, D]; logits [B, Hkv, G, T, S].
    qg = jnp.transpose(q.reshape(b, t, kv, cfg.num_heads // kv, hd), (0, 2, 3, 1, 4))
    logits = jnp.sum(qg[..., None].astype(f32) * ck[:, :, None, None].astype(f32), axis=-2)
    logits = logits * f32(1.0 / np.sqrt(hd))
    logits = jnp.where(allowed[:, None, None], logits, f32(-0.7 * np.finfo(np.float32).max))
    probs = jax.nn.softmax(logits, axis=-1).astype(cv.dtype).astype(f32)
    out = jnp.sum(probs[..., None] * cv[:, :, None, None].astype(f32), axis=-2)
    out = jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(b, t, -1).astype(q.dtype)
    x = x + att.o_proj(out)
    return x + blk.mlp(blk.post_attn_norm(x)), ck, cv

  def __call__(
    self,
    input_ids: jax.Array | None = None,
    *,
    inputs_embeds: jax.Array | None = None,
    attention_mask: jax.Array | None = None,
    cache: LayerCache,
    logits: bool = True,
  ) -> DecoderOutput:
    lm = self.lm
    x = lm.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
    x = x.astype(lm.cfg.compute_dtype)
    b, t = x.shape[:2]
    mask = jnp.ones((b, t), bool) if attention_mask is None else attention_mask.astype(bool)
    positions = positions_from_mask(mask, cache.mask.sum(-1).astype(jnp.int32))
    q_slot = cache.index[:, None] + jnp.arange(t)[None]
    kv_mask = _write_rows(cache.mask, mask, cache.index, axis=0)
    # allowed[b, t, s]: slot s holds a real token, not in the future of query t.
    slots = jnp.arange(kv_mask.shape[1])
    allowed = kv_mask[:, None, :] & (slots[None, None, :] <= q_slot[:, :, None])
    inv_freq = rope_inv_freq(lm.cfg)
    ks, vs = [], []
    for blk, ck, cv in zip(self.blocks, cache.k, cache.v):
      x, ck, cv = self._block(blk, x, positions, inv_freq, allowed, ck, cv, cache.index)
      ks.append(ck)
      vs.append(cv)
    hidden = lm.final_norm(x)
    moved = jnp.any(mask, axis=-1).astype(jnp.int32) * t
    new = LayerCache(k=tuple(ks), v=tuple(vs), mask=kv_mask, index=cache.index + moved)
    return DecoderOutput(logits=lm.logits(hidden) if logits else None, hidden=hidden, cache=new)


def _latent_loop(
  model: Any, steps: _Steps, cache: LayerCache, h: jax.Array, keys: jax.Array, cfg: RolloutConfig
) -> dict[str, Any]:
  """Runs up to ``num_latents`` latent steps in a ``lax.while_loop`` (see module doc)."""
  b, d = h.shape
  n_lat = cfg.num_latents
  sampled = cfg.latent_mode == "sampled"
  carry = dict(
    step=jnp.zeros((), jnp.int32),
    cache=cache,
    h=h,
    done=jnp.zeros((b,), bool),
    n=jnp.zeros((b,), jnp.int32),
    latents=jnp.zeros((b, n_lat, d), jnp.float32),
    mask=jnp.zeros((b, n_lat), bool),
    lps=jnp.zeros((b, n_lat), jnp.float32),
    eot_lp=jnp.zeros((b,), jnp.float32),
    thought_done=jnp.zeros((b,), bool),
  )
  if n_lat == 0:
    return carry
  # Every step's keys and latent noise, drawn before the loop: the same values as drawing
  # them step by step, in one batched call instead of three small threefry loops a step.
  all_keys = jax.vmap(lambda t: jax.vmap(lambda k: jax.random.split(k, 2))(_row_fold(keys, t)))(
    jnp.arange(n_lat)
  )  # [L, B, 2]
  all_noise = jax.vmap(jax.vmap(lambda k: jax.random.normal(k, (d,), jnp.float32)))(
    all_keys[:, :, 0]
  )  # [L, B, D]

  def cond(c):
    return (c["step"] < n_lat) & ~jnp.all(c["done"])

  def body(c):
    step = c["step"]
    step_keys = all_keys[step]
    active = ~c["done"]
    if sampled:
      # Temperature-1 Gaussian = the policy (scored for RL); sampling scales std by tau.
      g = model.latent_head(c["h"], temperature=1.0)
      if g.log_std is None:  # deterministic head ablation: mean, no density
        z, lp = g.mean, jnp.zeros((b,), jnp.float32)
      else:
        noise = all_noise[step]
        z = g.mean + jnp.exp(g.log_std) * cfg.latent_temperature * noise
        lp = g.log_prob(z).mean(-1)
      emb = z * cfg.embed_std
    else:
      emb = _project(model, c["h"], cfg.projection).astype(jnp.float32)
      lp = jnp.zeros((b,), jnp.float32)
    out = steps(
      inputs_embeds=emb[:, None], attention_mask=active[:, None], cache=c["cache"], logits=sampled
    )
    new = dict(c)
    if sampled:
      logits = out.logits[:, 0]
      tok = sample_tokens(step_keys[:, 1], logits, temperature=cfg.eot_temperature)
      is_eot = active & (tok == cfg.separator_id)
      new["thought_done"] = c["thought_done"] | is_eot
      new["done"] = c["done"] | is_eot
    new["latents"] = c["latents"].at[:, step].set(jnp.where(active[:, None], emb, 0.0))
    new["mask"] = c["mask"].at[:, step].set(active)
    new["lps"] = c["lps"].at[:, step].set(jnp.where(active, lp, 0.0))
    new["n"] = c["n"] + active.astype(jnp.int32)
    new["h"] = jnp.where(active[:, None], out.hidden[:, 0], c["h"])
    new["cache"] = out.cache
    new["step"] = step + 1
    return new

  out = jax.lax.while_loop(cond, body, carry)
  if sampled:
    # log p(separator) after each row's last latent: the loop froze ``h`` there, so one
    # LM head after the loop replaces a full-vocabulary log-softmax per step.
    sep = jnp.full((b,), cfg.separator_id, jnp.int32)
    out["eot_lp"] = token_logprobs(steps.lm.logits(out["h"]), sep)
  return out


def _answer_loop(
  steps: _Steps, cache: LayerCache, logits: jax.Array, keys: jax.Array, cfg: RolloutConfig
) -> dict[str, Any]:
  """Samples up to ``max_new_tokens`` answer tokens from the cache, stopping rows at EOS.

  A row that has emitted EOS is fed with mask 0 (its cache freezes) and records
  ``pad_id`` / mask False from then on.
  """
  b = logits.shape[0]
  t_max = cfg.max_new_tokens
  carry = dict(
    t=jnp.zeros((), jnp.int32),
    cache=cache,
    logits=logits,
    finished=jnp.zeros((b,), bool),
    ids=jnp.full((b, t_max), cfg.pad_id, jnp.int32),
    mask=jnp.zeros((b, t_max), bool),
    lps=jnp.zeros((b, t_max), jnp.float32),
  )

  all_keys = jax.vmap(lambda t: _row_fold(keys, t))(jnp.arange(t_max))  # [T, B], as above

  def cond(c):
    return (c["t"] < t_max) & ~jnp.all(c["finished"])

  def body(c):
    t = c["t"]
    tok = sample_tokens(
      all_keys[t],
      c["logits"],
      temperature=cfg.temperature,
      top_p=cfg.top_p,
      top_k=cfg.top_k,
      greedy=cfg.greedy,
    )
    alive = ~c["finished"]
    lp = token_logprobs(c["logits"], tok)
    finished = c["finished"] | (alive & (tok == cfg.eos_id))
    out = steps(tok[:, None], attention_mask=~finished[:, None], cache=c["cache"])
    return dict(
      t=t + 1,
      cache=out.cache,
      logits=out.logits[:, 0],
      finished=finished,
      ids=c["ids"].at[:, t].set(jnp.where(alive, tok, cfg.pad_id)),
      mask=c["mask"].at[:, t].set(alive),
      lps=c["lps"].at[:, t].set(jnp.where(alive, lp, 0.0)),
    )

  return jax.lax.while_loop(cond, body, carry)


@functools.partial(jax.jit, static_argnames=("graphdef", "cfg"))
def rollout_fn(
  graphdef: nnx.GraphDef,
  state: nnx.State,
  prompt_ids: jax.Array,
  prompt_mask: jax.Array,
  rng: jax.Array,
  row_ids: jax.Array,
  *,
  cfg: RolloutConfig,
) -> RolloutOutput:
  """Pure jitted rollout. Compiles once per (batch, prompt length, cfg, graphdef).

  ``graphdef, state = nnx.split(model)`` is done ONCE by the caller; the model is
  re-merged here at trace time. ``prompt_ids/mask`` [B, P] left-padded; ``rng`` one
  PRNG key; ``row_ids`` [B] int32 (per-row RNG streams, see module doc). The KV cache
  is allocated inside, so there is nothing large to donate: XLA updates the loop
  carries (cache, output buffers) in place.
  """
  TRACE_COUNTS[cfg.latent_mode] += 1
  model = nnx.merge(graphdef, state)
  lm = _lm(model)
  b, p = prompt_ids.shape
  prompt_mask = prompt_mask.astype(bool)
  row_keys = jax.vmap(lambda i: jax.random.fold_in(rng, i))(row_ids.astype(jnp.uint32))
  streams = jax.vmap(lambda k: jax.random.split(k, 2))(row_keys)
  # The prompt attends over its own P slots only; the empty slots for the latents and
  # the answer are appended after the prefill.
  pre = lm(prompt_ids, attention_mask=prompt_mask, cache=KVCache.init(lm.cfg, b, p), logits=False)
  h_last = pre.hidden[:, -1]  # left padding: the last column is every row's last token
  steps = _Steps(lm)
  cache = LayerCache.of(pre.cache, cfg.cache_length(p))
  lat = _latent_loop(model, steps, cache, h_last, streams[:, 0], cfg)
  if cfg.append_separator:
    sep = jnp.full((b, 1), cfg.separator_id, jnp.int32)
    out = steps(sep, cache=lat["cache"])
    cache, logits = out.cache, out.logits[:, 0]
  else:
    cache, logits = lat["cache"], lm.logits(h_last)
  ans = _answer_loop(steps, cache, logits, streams[:, 1], cfg)
  return RolloutOutput(
    answer_ids=ans["ids"],
    answer_mask=ans["mask"],
    answer_logprobs=ans["lps"],
    answer_done=ans["finished"],
    num_latents=lat["n"],
    latents=lat["latents"],
    latent_mask=lat["mask"],
    latent_logprobs=lat["lps"],
    eot_logprob=lat["eot_lp"],
    thought_done=lat["thought_done"],
  )


# ----------------------------------------------------------------------------
# Host-side wrappers (bucketing)
# ----------------------------------------------------------------------------
def bucket_size(n: int, buckets: Sequence[int]) -> int:
  """Smallest bucket >= n; past the largest, the next multiple of the largest."""
  for v in sorted(buckets):
    if v >= n:
      return int(v)
  top = max(buckets)
  return int(-(-n // top) * top)


def pad_prompts(
  prompt_ids: Any, prompt_mask: Any, *, batch: int, length: int, pad_id: int = 0
) -> tuple[jax.Array, jax.Array]:
  """Left-pads columns to ``length`` and fills extra rows with copies of row 0.

  Copies of a real row (rather than empty rows) keep every row well-formed (no
  all-masked attention); their outputs are sliced off by the caller.
  """
  ids = jnp.asarray(prompt_ids, jnp.int32)
  mask = jnp.asarray(prompt_mask).astype(bool)
  b, p = ids.shape
  if length > p:
    ids = jnp.pad(ids, ((0, 0), (length - p, 0)), constant_values=pad_id)
    mask = jnp.pad(mask, ((0, 0), (length - p, 0)))
  if batch > b:
    ids = jnp.concatenate([ids, jnp.repeat(ids[:1], batch - b, 0)], 0)
    mask = jnp.concatenate([mask, jnp.repeat(mask[:1], batch - b, 0)], 0)
  return ids, mask


def rollout(
  graphdef: nnx.GraphDef,
  state: nnx.State,
  prompt_ids: Any,
  prompt_mask: Any,
  rng: jax.Array,
  cfg: RolloutConfig,
  *,
  row_ids: Any = None,
  batch_buckets: Sequence[int] | None = DEFAULT_BATCH_BUCKETS,
  length_buckets: Sequence[int] | None = None,
) -> RolloutOutput:
  """Buckets the batch shape, runs :func:`rollout_fn`, drops the padding rows.

  No host sync: the result stays on device (``jax.device_get`` it when needed).
  ``batch_buckets=None`` / ``length_buckets=None`` keep that dimension as given.
  """
  b, p = np.shape(prompt_ids)
  rows = jnp.arange(b, dtype=jnp.int32) if row_ids is None else jnp.asarray(row_ids, jnp.int32)
  bb = bucket_size(b, batch_buckets) if batch_buckets else b
  pp = bucket_size(p, length_buckets) if length_buckets else p
  ids, mask = pad_prompts(prompt_ids, prompt_mask, batch=bb, length=pp, pad_id=cfg.pad_id)
  if bb > b:
    rows = jnp.concatenate([rows, jnp.repeat(rows[:1], bb - b)])
  out = rollout_fn(graphdef, state, ids, mask, rng, rows, cfg=cfg)
  return out if bb == b else jax.tree.map(lambda x: x[:b], out)


# ----------------------------------------------------------------------------
# Teacher-forced recomputation (RL)
# ----------------------------------------------------------------------------
@flax.struct.dataclass
class RolloutScores:
  latent_logprobs: jax.Array  # [B, L] (0 where masked / not "sampled")
  eot_logprob: jax.Array  # [B] (0 unless "sampled")
  answer_logprobs: jax.Array  # [B, T] (0 where masked)


def score_rollout(
  model: Any, prompt_ids: jax.Array, prompt_mask: jax.Array, out: RolloutOutput, cfg: RolloutConfig
) -> RolloutScores:
  """Log-probs of a finished rollout under ``model`` with ONE full forward, no cache.

  Sequence: ``[prompt | latents (latent_mask) | separator | answer (answer_mask)]``
  (no latents / separator in "none" mode). Latent i is scored by the latent head on the
  hidden state just before it; the end-of-thinking decision by the logits at the last
  real latent; answer token t by the logits one position before it. Differentiable
  in ``model``; with the rollout's own parameters it reproduces the rollout's
  log-probs (tested to 1e-4 in fp32), which is what the GRPO ratio relies on.
  Masked latents sit between the last real latent and the separator; they are
  excluded by the mask and positions skip them, exactly like the frozen cache rows.
  """
  lm = _lm(model)
  dtype = lm.cfg.compute_dtype
  b, p = prompt_ids.shape
  n_lat = out.latents.shape[1]
  prompt_mask = prompt_mask.astype(bool)
  embs, masks = [lm.embed_tokens(prompt_ids)], [prompt_mask]
  if cfg.append_separator:
    embs += [
      out.latents.astype(dtype),
      lm.embed_tokens(jnp.full((b, 1), cfg.separator_id, jnp.int32)),
    ]
    masks += [out.latent_mask, jnp.ones((b, 1), bool)]
  embs.append(lm.embed_tokens(out.answer_ids))
  masks.append(out.answer_mask)
  hidden = lm(
    inputs_embeds=jnp.concatenate([e.astype(dtype) for e in embs], 1),
    attention_mask=jnp.concatenate(masks, 1),
    logits=False,
  ).hidden
  zeros_b = jnp.zeros((b,), jnp.float32)
  lat_lp, eot_lp = jnp.zeros((b, n_lat), jnp.float32), zeros_b
  if cfg.latent_mode == "sampled" and n_lat > 0:
    g = model.latent_head(hidden[:, p - 1 : p - 1 + n_lat], temperature=1.0)
    if g.log_std is not None:
      lat_lp = g.log_prob(out.latents / cfg.embed_std).mean(-1)
      lat_lp = jnp.where(out.latent_mask, lat_lp, 0.0)
    last = jnp.take_along_axis(hidden, (p - 1 + out.num_latents)[:, None, None], 1)[:, 0]
    eot_lp = token_logprobs(lm.logits(last), jnp.full((b,), cfg.separator_id, jnp.int32))
  start = p + n_lat + 1 if cfg.append_separator else p  # column of answer token 0
  t_max = out.answer_ids.shape[1]
  ans_logits = lm.logits(hidden[:, start - 1 : start - 1 + t_max])
  ans_lp = jnp.where(out.answer_mask, token_logprobs(ans_logits, out.answer_ids), 0.0)
  return RolloutScores(latent_logprobs=lat_lp, eot_logprob=eot_lp, answer_logprobs=ans_lp)
