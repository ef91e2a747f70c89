"""Rollout invariants: end-of-thinking bookkeeping, batch invariance, cache == full
forward, log-probs == teacher-forced recomputation, nucleus sampling, compile counts.

Every test shares one tiny model shape (vocab 32, d 64, 2 layers, untied LM head) and,
where possible, one RolloutConfig and batch shape, so the whole file compiles the
rollout only a handful of times. Different weights (the LM head's separator column is
rescaled to control when rows stop thinking) reuse the same compiled program.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from colar_jax import config
from colar_jax.data import prompts
from colar_jax.decode import rollout as R
from colar_jax.decode.sampling import sample_tokens, top_p_mask
from colar_jax.model import CoLaRModel, ModelConfig
from colar_jax.train.run import rollout_config

CFG = ModelConfig(
  vocab_size=32,
  hidden_size=64,
  num_layers=2,
  num_heads=4,
  num_kv_heads=2,
  head_dim=16,
  intermediate_size=128,
  tie_embeddings=False,
)
SEP, EOS, L, T, P = 5, 2, 6, 5, 8
RC = R.RolloutConfig(
  separator_id=SEP, eos_id=EOS, max_latent_steps=L, max_new_tokens=T, embed_std=0.02, top_p=0.9
)
PADS = (0, 3, 1, 5)


def _model(sep_scale: float | None = None, others_scale: float = 1.0, seed: int = 0):
  """The tiny model; optionally LM-head column SEP = sep_scale * (random unit vector).

  sep_scale 1000: p(separator) is ~0 or ~1 at each latent (sign of h.u) so rows stop
  at varied but nearly deterministic steps; ~3: stochastic stops; others_scale 1000
  with sep_scale 0: the separator is never drawn.
  """
  m = CoLaRModel(CFG, rngs=nnx.Rngs(0))
  if sep_scale is not None:
    u = jax.random.normal(jax.random.key(seed), (CFG.hidden_size,))
    k = m.lm.lm_head.kernel[...] * others_scale
    m.lm.lm_head.kernel[...] = k.at[:, SEP].set(sep_scale * u / jnp.linalg.norm(u))
  return m


def _prompts():
  ids = np.random.default_rng(0).integers(6, CFG.vocab_size, (4, P)).astype(np.int32)
  mask = np.ones_like(ids, bool)
  for i, pad in enumerate(PADS):
    mask[i, :pad] = False
    ids[i, :pad] = 0
  return ids, mask


def _run(model, cfg=RC, seed=0, ids=None, mask=None, **kw):
  g, s = nnx.split(model)
  if ids is None:
    ids, mask = _prompts()
  return jax.device_get(R.rollout(g, s, ids, mask, jax.random.key(seed), cfg, **kw))


def _full_hidden(model, ids, mask, out, cfg):
  """Teacher-forced hidden states over [prompt | latents | sep | answer], no cache."""
  lm = model.lm
  b = ids.shape[0]
  embs, masks = [lm.embed_tokens(jnp.asarray(ids))], [jnp.asarray(mask)]
  if cfg.append_separator:
    embs += [jnp.asarray(out.latents), lm.embed_tokens(jnp.full((b, 1), SEP))]
    masks += [jnp.asarray(out.latent_mask), jnp.ones((b, 1), bool)]
  embs.append(lm.embed_tokens(jnp.asarray(out.answer_ids)))
  masks.append(jnp.asarray(out.answer_mask))
  return lm(
    inputs_embeds=jnp.concatenate(embs, 1), attention_mask=jnp.concatenate(masks, 1), logits=False
  ).hidden


def test_row_stopping_at_step_k_has_exactly_k_latents():
  model = _model(sep_scale=1000.0, seed=2)
  ids, mask = _prompts()
  out = _run(model)
  n = out.num_latents
  assert len(set(n.tolist())) >= 3, n  # the forcing gives varied stop steps
  np.testing.assert_array_equal(out.latent_mask, np.arange(L)[None] < n[:, None])
  # Decision logits = the LM head right AFTER each latent (teacher-forced, no cache).
  h = _full_hidden(model, ids, mask, out, RC)
  logp_sep = np.asarray(jax.nn.log_softmax(model.lm.logits(h[:, P : P + L]))[..., SEP])
  for b in range(4):
    k = int(n[b])
    if out.thought_done[b]:
      assert logp_sep[b, k - 1] > np.log(0.999), (b, logp_sep[b])
    else:
      assert k == L
    assert (logp_sep[b, : k - 1] < np.log(1e-3)).all(), (b, logp_sep[b])


def test_batch_invariance_alone_vs_in_batch():
  """A row's latents / answer do not depend on its neighbours or its left padding."""
  model = _model(sep_scale=3.0)
  ids, mask = _prompts()
  rows = np.array([10, 11, 12, 13])
  batch = _run(model, row_ids=rows, seed=7)
  assert len(set(batch.num_latents.tolist())) >= 2
  for b in range(4):
    extra = 4  # different left padding than in the batch
    ids1 = np.pad(ids[b : b + 1], ((0, 0), (extra, 0)))
    mask1 = np.pad(mask[b : b + 1], ((0, 0), (extra, 0)))
    alone = _run(model, ids=ids1, mask=mask1, row_ids=rows[b : b + 1], seed=7)
    assert alone.num_latents[0] == batch.num_latents[b]
    np.testing.assert_array_equal(alone.answer_ids[0], batch.answer_ids[b])
    np.testing.assert_array_equal(alone.answer_mask[0], batch.answer_mask[b])
    np.testing.assert_allclose(alone.latents[0], batch.latents[b], atol=1e-6)
    np.testing.assert_allclose(alone.answer_logprobs[0], batch.answer_logprobs[b], atol=1e-4)


def test_logprobs_equal_teacher_forced_recomputation():
  model = _model(sep_scale=3.0)
  ids, mask = _prompts()
  for seed in (0, 1):
    out = _run(model, seed=seed)
    sc = jax.device_get(R.score_rollout(model, jnp.asarray(ids), jnp.asarray(mask), out, RC))
    print("n_latents", out.num_latents, "answer lens", out.answer_mask.sum(-1))
    np.testing.assert_allclose(sc.latent_logprobs, out.latent_logprobs, atol=1e-4)
    np.testing.assert_allclose(sc.eot_logprob, out.eot_logprob, atol=1e-4)
    np.testing.assert_allclose(sc.answer_logprobs, out.answer_logprobs, atol=1e-4)
    assert (out.latent_logprobs[~out.latent_mask] == 0).all()


def test_cached_greedy_decoding_equals_full_forward_and_is_deterministic():
  model = _model()
  ids, mask = _prompts()
  det = RC.replace(greedy=True, latent_temperature=0.0, eot_temperature=0.0)
  out = _run(model, det, seed=0)
  again = _run(model, det, seed=123)  # no randomness left: a different key changes nothing
  jax.tree.map(np.testing.assert_array_equal, out, again)
  h = _full_hidden(model, ids, mask, out, det)
  start = P + L + 1
  argmax = np.asarray(jnp.argmax(model.lm.logits(h[:, start - 1 : start - 1 + T]), -1))
  np.testing.assert_array_equal(
    np.where(out.answer_mask, argmax, 0), np.where(out.answer_mask, out.answer_ids, 0)
  )
  assert out.answer_mask[:, 0].all()


def test_decode_steps_equal_the_decoders_cached_calls():
  """The rollout's unrolled decode step (own cache layout and attention core) against
  the decoder's scanned cached call, with q/k/v biases, LoRA and grouped-query heads,
  over steps where some rows are masked (their cache must freeze)."""
  cfg = CFG.replace(qkv_bias=True, lora_rank=2, tie_embeddings=True)
  lm = CoLaRModel(cfg, rngs=nnx.Rngs(1)).lm
  for path, leaf in nnx.iter_graph(lm):  # LoRA B is zero-initialised: make it count
    if isinstance(leaf, nnx.LoRAParam):
      leaf[...] = jax.random.normal(jax.random.key(len(path)), leaf[...].shape) * 0.1
  ids, mask = _prompts()
  length = P + 4
  pre = lm(jnp.asarray(ids), attention_mask=jnp.asarray(mask), cache=R.KVCache.init(cfg, 4, length))
  ours = R.LayerCache.of(
    lm(jnp.asarray(ids), attention_mask=jnp.asarray(mask), cache=R.KVCache.init(cfg, 4, P)).cache,
    length,
  )
  theirs, steps = pre.cache, R._Steps(lm)
  rng = np.random.default_rng(1)
  for t, active in enumerate(([1, 1, 1, 1], [1, 0, 1, 1], [0, 0, 1, 1])):
    tok = jnp.asarray(rng.integers(0, CFG.vocab_size, (4, 1)), jnp.int32)
    act = jnp.asarray(active, bool)[:, None]
    if t == 1:  # latent steps feed embeddings
      emb = jax.random.normal(jax.random.key(t), (4, 1, CFG.hidden_size)) * 0.02
      a = lm(inputs_embeds=emb, attention_mask=act, cache=theirs)
      b = steps(inputs_embeds=emb, attention_mask=act, cache=ours)
    else:
      a, b = lm(tok, attention_mask=act, cache=theirs), steps(tok, attention_mask=act, cache=ours)
    np.testing.assert_allclose(b.logits, a.logits, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(b.hidden, a.hidden, atol=1e-5, rtol=1e-5)
    theirs, ours = a.cache, b.cache
    np.testing.assert_array_equal(ours.index, theirs.index)
    np.testing.assert_array_equal(ours.mask, theirs.mask)
    real = np.asarray(theirs.mask)  # padding slots hold junk that nothing attends to
    for layer in range(CFG.num_layers):  # ours: k [B, Hkv, D, S], v [B, Hkv, S, D]
      for order, mine, ref in (((0, 3, 1, 2), ours.k, theirs.k), ((0, 2, 1, 3), ours.v, theirs.v)):
        np.testing.assert_allclose(
          np.transpose(mine[layer], order)[real], ref[layer][real], atol=1e-5, rtol=1e-5
        )


def test_max_latent_steps_respected():
  model = _model(sep_scale=0.0, others_scale=1000.0)  # the separator is never drawn
  out = _run(model)
  assert out.latents.shape == (4, L, CFG.hidden_size)
  np.testing.assert_array_equal(out.num_latents, [L] * 4)
  assert out.latent_mask.all() and not out.thought_done.any()


def test_token_decoding_matches_full_forward():
  """The "none" latent mode (CoT / No-CoT): plain decoding from the prompt."""
  model = _model()
  ids, mask = _prompts()
  cfg = RC.replace(latent_mode="none", greedy=True)
  g, s = nnx.split(model)
  out = jax.device_get(R.rollout(g, s, ids, mask, jax.random.key(0), cfg))
  assert out.latents.shape == (4, 0, CFG.hidden_size) and (out.num_latents == 0).all()
  h = _full_hidden(model, ids, mask, out, cfg)
  argmax = np.asarray(jnp.argmax(model.lm.logits(h[:, P - 1 : P - 1 + T]), -1))
  m = out.answer_mask
  np.testing.assert_array_equal(argmax[m], out.answer_ids[m])
  sc = R.score_rollout(model, jnp.asarray(ids), jnp.asarray(mask), out, cfg)
  np.testing.assert_allclose(sc.answer_logprobs, out.answer_logprobs, atol=1e-4)


def test_hidden_latent_mode_feeds_last_hidden_state():
  """Coconut / Distill: N latents, each the previous last hidden state."""
  model = _model()
  ids, mask = _prompts()
  cfg = RC.replace(latent_mode="hidden", max_latent_steps=3, greedy=True)
  out = _run(model, cfg)
  np.testing.assert_array_equal(out.num_latents, [3] * 4)
  h = np.asarray(_full_hidden(model, ids, mask, out, cfg))
  np.testing.assert_allclose(out.latents, h[:, P - 1 : P + 2], atol=1e-5)


def test_top_p_keeps_only_the_nucleus():
  probs = np.array([0.05, 0.5, 0.1, 0.2, 0.15])  # ranks: 1, 3, 4, 2, 0
  logits = jnp.log(jnp.asarray(probs))

  def keep(p):
    return np.asarray(top_p_mask(logits, p)).nonzero()[0].tolist()

  assert keep(0.01) == [1]  # top token always kept
  assert keep(0.6) == [1, 3]  # 0.5 < 0.6 <= 0.7
  assert keep(0.75) == [1, 3, 4]  # 0.7 < 0.75 <= 0.85
  assert keep(1.0) == [0, 1, 2, 3, 4]
  n = 4000
  keys = jax.random.split(jax.random.key(0), n)
  draws = np.asarray(sample_tokens(keys, jnp.broadcast_to(logits, (n, 5)), top_p=0.6))
  assert set(draws.tolist()) == {1, 3}
  assert abs((draws == 1).mean() - 0.5 / 0.7) < 0.03  # renormalised nucleus
  greedy = sample_tokens(keys[:2], jnp.broadcast_to(logits, (2, 5)), greedy=True)
  assert np.asarray(greedy).tolist() == [1, 1]


def test_answer_top_k_reaches_the_sampler():
  """top_k = 1 decodes the answer greedily (top-p 0.9 alone would sample it)."""
  model = _model(sep_scale=3.0)
  det = RC.replace(latent_temperature=0.0, eot_temperature=0.0)  # deterministic latents
  top1 = _run(model, det.replace(top_k=1), seed=3)
  greedy = _run(model, det.replace(greedy=True), seed=4)  # the config of the greedy test
  np.testing.assert_array_equal(top1.num_latents, greedy.num_latents)
  np.testing.assert_array_equal(top1.answer_ids, greedy.answer_ids)
  sampled = _run(model, seed=3)
  assert (sampled.answer_ids != greedy.answer_ids).any()


def test_one_compilation_per_bucket():
  model = _model()
  ids, mask = _prompts()
  _run(model, ids=ids, mask=mask)  # warm the (4, P) bucket
  before = R.compilation_count()
  for b, seed in ((3, 1), (4, 2), (4, 3)):  # 3 rows pad to the 4-row bucket
    out = _run(model, ids=ids[:b], mask=mask[:b], seed=seed)
    assert out.answer_ids.shape == (b, T)
  assert R.compilation_count() == before
  _run(model, ids=ids[:2], mask=mask[:2])  # new bucket -> one new compilation
  assert R.compilation_count() == before + 1


def test_config_validation():
  with pytest.raises(ValueError, match="latent_mode"):
    RC.replace(latent_mode="bogus")
  with pytest.raises(ValueError, match="top_p"):
    RC.replace(top_p=0.0)
  with pytest.raises(ValueError, match="top_k"):
    RC.replace(top_k=-1)


class _Tok:
  """Just what ``train.run.rollout_config`` reads of a tokenizer: "###" is one id."""

  def __init__(self, eos):
    self.eos_token_id, self.pad_token_id = eos, 7

  def __call__(self, texts, add_special_tokens=False):
    return {"input_ids": [[SEP] if t == "###" else [9] * len(t) for t in texts]}


def test_rollout_config_of_the_typed_section():
  """The trainers' builder: the ``rollout`` section + the tokenizer's ids + overrides."""
  c = config.apply_overrides(
    config.base_config(),
    ["rollout.max_latent_steps=3", "rollout.top_p=0.5", "rollout.top_k=7", "rollout.greedy=true"],
  )
  run = config.from_config_dict(c)
  templates = prompts.PromptTemplates.of(run.data)
  rc = rollout_config(run.rollout, _Tok(EOS), templates, 0.1, latent_mode="hidden")
  assert rc == R.RolloutConfig(
    separator_id=SEP,
    eos_id=EOS,
    pad_id=7,
    latent_mode="hidden",
    max_latent_steps=3,
    latent_temperature=1.0,
    eot_temperature=1.0,
    embed_std=0.1,
    max_new_tokens=16,
    temperature=1.0,
    top_p=0.5,
    top_k=7,
    greedy=True,
  )
  assert rollout_config(run.rollout, _Tok(None), templates, 0.1).eos_id == -1
  with pytest.raises(ValueError, match="separator"):  # "@@" is two tokens here
    rollout_config(run.rollout, _Tok(EOS), dataclasses.replace(templates, separator="@@"), 0.1)
  with pytest.raises(config.ConfigError, match="rollout.top_p"):
    config.apply_overrides(config.base_config(), ["rollout.top_p=0"])
  assert rollout_config(config.Rollout(), _Tok(EOS), templates, 0.1).top_k == 50  # HF's default
  with pytest.raises(config.ConfigError, match="rollout.top_k"):
    config.from_config_dict(config.apply_overrides(config.base_config(), ["rollout.top_k=-1"]))
