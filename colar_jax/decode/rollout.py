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
3. the separator token is appended and the answer is sampled (temperature + top-p, or
   greedy) until EOS -- here CONTINUING FROM THE SAME KV CACHE (the reference re-runs
   the whole prefix through ``generate``; the result is the same distribution).

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
from colar_jax.model import KVCache

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
  greedy: bool = _DEFAULTS.greedy

  def __post_init__(self) -> None:
    if self.latent_mode not in LATENT_MODES:
      raise ValueError(f"latent_mode {self.latent_mode!r} not in {LATENT_MODES}")
    if self.max_latent_steps < 0 or self.max_new_tokens < 1:
      raise ValueError("need max_latent_steps >= 0 and max_new_tokens >= 1")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
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


def _latent_loop(
  model: Any, cache: KVCache, h: jax.Array, keys: jax.Array, cfg: RolloutConfig
) -> dict[str, Any]:
  """Runs up to ``num_latents`` latent steps in a ``lax.while_loop`` (see module doc)."""
  lm = _lm(model)
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

  def cond(c):
    return (c["step"] < n_lat) & ~jnp.all(c["done"])

  def body(c):
    step = c["step"]
    step_keys = jax.vmap(lambda k: jax.random.split(k, 2))(_row_fold(keys, step))
    active = ~c["done"]
    if sampled:
      # Temperature-1 Gaussian = the policy (scored for RL); sampling scales std by tau.
      g = model.latent_head(c["h"], temperature=1.0)
      if g.log_std is None:  # deterministic head ablation: mean, no density
        z, lp = g.mean, jnp.zeros((b,), jnp.float32)
      else:
        noise = jax.vmap(lambda k: jax.random.normal(k, (d,), jnp.float32))(step_keys[:, 0])
        z = g.mean + jnp.exp(g.log_std) * cfg.latent_temperature * noise
        lp = g.log_prob(z).mean(-1)
      emb = z * cfg.embed_std
    else:
      emb = _project(model, c["h"], cfg.projection).astype(jnp.float32)
      lp = jnp.zeros((b,), jnp.float32)
    out = lm(
      inputs_embeds=emb[:, None], attention_mask=active[:, None], cache=c["cache"], logits=sampled
    )
    new = dict(c)
    if sampled:
      logits = out.logits[:, 0]
      tok = sample_tokens(step_keys[:, 1], logits, temperature=cfg.eot_temperature)
      is_eot = active & (tok == cfg.separator_id)
      sep = jnp.full((b,), cfg.separator_id, jnp.int32)
      new["eot_lp"] = jnp.where(active, token_logprobs(logits, sep), c["eot_lp"])
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

  return jax.lax.while_loop(cond, body, carry)


def _answer_loop(
  lm: Any, cache: KVCache, logits: jax.Array, keys: jax.Array, cfg: RolloutConfig
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

  def cond(c):
    return (c["t"] < t_max) & ~jnp.all(c["finished"])

  def body(c):
    t = c["t"]
    tok = sample_tokens(
      _row_fold(keys, t),
      c["logits"],
      temperature=cfg.temperature,
      top_p=cfg.top_p,
      greedy=cfg.greedy,
    )
    alive = ~c["finished"]
    lp = token_logprobs(c["logits"], tok)
    finished = c["finished"] | (alive & (tok == cfg.eos_id))
    out = lm(tok[:, None], attention_mask=~finished[:, None], cache=c["cache"])
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
  cache = KVCache.init(lm.cfg, b, cfg.cache_length(p))
  pre = lm(prompt_ids, attention_mask=prompt_mask, cache=cache, logits=False)
  h_last = pre.hidden[:, -1]  # left padding: the last column is every row's last token
  lat = _latent_loop(model, pre.cache, h_last, streams[:, 0], cfg)
  if cfg.append_separator:
    sep = jnp.full((b, 1), cfg.separator_id, jnp.int32)
    out = lm(sep, cache=lat["cache"])
    cache, logits = out.cache, out.logits[:, 0]
  else:
    cache, logits = lat["cache"], lm.logits(h_last)
  ans = _answer_loop(lm, cache, logits, streams[:, 1], cfg)
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
