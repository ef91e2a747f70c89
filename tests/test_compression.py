"""CoLaR chain compression and SFT losses vs plain NumPy / CoT references (CPU, tiny)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from colar_jax import config, methods
from colar_jax.methods.colar import ColarSettings, colar_loss, latent_loss
from colar_jax.methods.compression import chain_layout, compress_chain, num_compressed_slots
from colar_jax.methods.cot import cot_loss
from colar_jax.model import CoLaRModel, Gaussian, ModelConfig

SEP = 5  # the "###" id in these hand-made batches


def ref_blocks(ids: np.ndarray, mask: np.ndarray, c: int) -> list[list[list[int]]]:
  """Per row: the compressed blocks (lists of token ids), right-aligned in Tc
  slots with empty lists as padding. Plain loop, as the reference groups."""
  t = ids.shape[1]
  tc = num_compressed_slots(t, c)
  out = []
  for row, m in zip(ids, mask):
    real = [int(x) for x, keep in zip(row, m) if keep]
    blocks = [real[:1]] if real else []
    rest = real[1:]
    blocks += [rest[i : i + c] for i in range(0, len(rest), c)]
    out.append([[] for _ in range(tc - len(blocks))] + blocks)
  return out


def make_chain(
  lengths: list[int], t: int, rng: np.random.Generator, *, left: bool = True
) -> tuple[np.ndarray, np.ndarray]:
  """Chains of ``###`` + random steps with the given real lengths, padded to t."""
  ids = np.zeros((len(lengths), t), np.int32)
  mask = np.zeros((len(lengths), t), np.int32)
  for b, n in enumerate(lengths):
    toks = [SEP] + list(rng.integers(6, 40, size=max(n - 1, 0)))
    toks = toks[:n]
    cols = slice(t - n, t) if left else slice(0, n)
    ids[b, cols], mask[b, cols] = toks, 1
  return ids, mask


EDGE_LENGTHS = [13, 1, 0, 2, 7, 12, 3, 4]  # full, only ###, empty, shorter than c, ...


@pytest.mark.parametrize("c", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("left", [True, False])
def test_grouping_matches_numpy_loop(c: int, left: bool) -> None:
  rng = np.random.default_rng(c)
  t = 13
  ids, mask = make_chain(EDGE_LENGTHS, t, rng, left=left)
  src, valid = jax.device_get(chain_layout(jnp.asarray(mask), c))
  ref = ref_blocks(ids, mask, c)
  assert src.shape == (len(EDGE_LENGTHS), num_compressed_slots(t, c), c)
  for b in range(len(EDGE_LENGTHS)):
    got = [
      [int(ids[b, s]) for s, v in zip(src[b, j], valid[b, j]) if v] for j in range(src.shape[1])
    ]
    assert got == ref[b], (c, b)
    # "###" is alone in the last sub-slot of its slot (the reference's alignment).
    if EDGE_LENGTHS[b]:
      first = np.argmax(valid[b].any(-1))
      assert valid[b, first].tolist() == [False] * (c - 1) + [True]


@pytest.mark.parametrize("sqrt_mean", [True, False])
def test_compressed_embeddings_and_labels(sqrt_mean: bool) -> None:
  rng = np.random.default_rng(0)
  table = rng.normal(size=(40, 6)).astype(np.float32)
  t, c = 11, 3
  ids, mask = make_chain([11, 5, 1, 3, 0, 9], t, rng)
  chain = compress_chain(
    lambda x: jnp.asarray(table)[x],
    jnp.asarray(ids),
    jnp.asarray(mask),
    c,
    key=jax.random.key(1),
    sqrt_mean=sqrt_mean,
  )
  ref = ref_blocks(ids, mask, c)
  emb, cmask, labels, lsrc = jax.device_get(
    (chain.embeds, chain.mask, chain.labels, chain.label_src)
  )
  for b, blocks in enumerate(ref):
    for j, blk in enumerate(blocks):
      assert bool(cmask[b, j]) == bool(blk)
      if not blk:
        np.testing.assert_array_equal(emb[b, j], 0.0)
        continue
      div = np.sqrt(len(blk)) if sqrt_mean else len(blk)
      np.testing.assert_allclose(emb[b, j], table[blk].sum(0) / div, rtol=1e-5, atol=1e-6)
      # The label is a real token of this very block, read from inside the block.
      assert int(labels[b, j]) in blk
      block_src = chain.src[b, j][chain.valid[b, j]]
      assert int(lsrc[b, j]) in jax.device_get(block_src).tolist()
      assert int(ids[b, lsrc[b, j]]) == int(labels[b, j])


def test_random_label_is_uniform_and_off_means_first_token() -> None:
  ids = np.array([[SEP, 10, 11, 12, 13, 14, 15]], np.int32)
  mask = np.ones_like(ids)
  c = 3  # blocks: [###] [10 11 12] [13 14 15]
  seen = set()
  for s in range(40):
    ch = compress_chain(
      lambda x: jax.nn.one_hot(x, 20), jnp.asarray(ids), jnp.asarray(mask), c, key=jax.random.key(s)
    )
    seen.add(tuple(jax.device_get(ch.labels[0]).tolist()))
  firsts = {lab[1] for lab in seen} | {lab[2] for lab in seen}
  assert {10, 11, 12} <= firsts and {13, 14, 15} <= firsts
  assert all(lab[0] == SEP for lab in seen)
  off = compress_chain(
    lambda x: jax.nn.one_hot(x, 20),
    jnp.asarray(ids),
    jnp.asarray(mask),
    c,
    key=None,
    random_label=False,
  )
  assert jax.device_get(off.labels[0]).tolist() == [SEP, 10, 13]


def test_latent_loss_zero_at_target() -> None:
  target = jax.random.normal(jax.random.key(0), (2, 4, 8))
  mask = jnp.array([[0, 1, 1, 1], [1, 1, 1, 1]], bool)
  det = Gaussian(mean=target, log_std=None)
  assert float(latent_loss(det, target, mask, kind="mse", sample=det.sample(None))) == 0.0
  off = Gaussian(mean=target + jnp.where(mask[..., None], 0.0, 7.0), log_std=None)
  # Differences at masked positions do not count.
  assert float(latent_loss(off, target, mask, kind="mse", sample=off.mean)) == 0.0
  # NLL is minimised (over the mean) at the target: any shift increases it.
  g = Gaussian(mean=target, log_std=jnp.zeros_like(target))
  g2 = Gaussian(mean=target + 0.1, log_std=jnp.zeros_like(target))
  nll = latent_loss(g, target, mask, kind="nll", sample=target)
  assert float(nll) == pytest.approx(0.5 * np.log(2 * np.pi), rel=1e-5)
  assert float(latent_loss(g2, target, mask, kind="nll", sample=target)) > float(nll)


# ----------------------------------------------------------------------------- model losses
TINY = ModelConfig(
  vocab_size=40,
  hidden_size=32,
  intermediate_size=64,
  num_layers=2,
  num_heads=2,
  num_kv_heads=1,
  head_dim=16,
)


def sft_batch(rng: np.random.Generator, b: int = 4) -> dict[str, np.ndarray]:
  """Hand-made batch in the ``encode_sft_batch`` format."""
  q_len, s_len, a_len = 8, 11, 6
  q_ids, q_mask = make_chain([8, 5, 6, 7], q_len, rng)
  s_ids, s_mask = make_chain([11, 4, 1, 8], s_len, rng)
  a_ids, a_mask = make_chain([6, 3, 4, 5], a_len, rng, left=False)
  a_ids[:, 0] = SEP
  return dict(
    question_ids=q_ids,
    question_mask=q_mask,
    steps_ids=s_ids,
    steps_mask=s_mask,
    answer_ids=a_ids,
    answer_mask=a_mask,
  )


@pytest.fixture(scope="module")
def tiny_model() -> CoLaRModel:
  return CoLaRModel(TINY, rngs=nnx.Rngs(0))


def test_c1_equals_cot_ce(tiny_model: CoLaRModel) -> None:
  batch = {k: jnp.asarray(v) for k, v in sft_batch(np.random.default_rng(3)).items()}
  settings = ColarSettings(colar=config.Colar(embed_modeling_weight=0.0))
  graphdef, state = nnx.split(tiny_model)

  @jax.jit
  def both(st, batch):
    model = nnx.merge(graphdef, st)
    key = jax.random.key(0)
    return (
      colar_loss(model, batch, key, c=1, settings=settings),
      cot_loss(model, batch, key, c=1),
      methods.get("cot").loss(model, batch, key, c=1, settings=None),
      model.lm(brute_ids).logits,
    )

  # Brute force CoT CE: rows without padding (right-padded, which never affects
  # earlier positions), position t - 1 predicts token t.
  rows, q_lens = [], []
  for b in range(4):
    rows.append(
      [
        int(x)
        for part in ("question", "steps", "answer")
        for x, k in zip(batch[f"{part}_ids"][b], batch[f"{part}_mask"][b])
        if k
      ]
    )
    q_lens.append(int(batch["question_mask"][b].sum()))
  width = max(map(len, rows))
  brute_ids = jnp.asarray([r + [0] * (width - len(r)) for r in rows])
  (total, m), (cot_total, cot_m), (reg_total, _), logits = jax.device_get(both(state, batch))
  np.testing.assert_allclose(total, cot_total, rtol=1e-6)
  np.testing.assert_allclose(reg_total, cot_total, rtol=1e-6)  # the registry's "cot"
  np.testing.assert_allclose(m["ce_loss"], cot_m["ce_loss"], rtol=1e-6)
  assert float(m["n_tokens"]) == float(cot_m["n_tokens"]) == 24 + 18  # chain + answer
  logp = jax.nn.log_softmax(logits, -1)
  nll = [-logp[b, t - 1, r[t]] for b, r in enumerate(rows) for t in range(q_lens[b], len(r))]
  np.testing.assert_allclose(cot_m["ce_loss"], np.mean(nll), rtol=1e-5)


@pytest.mark.parametrize("kind", ["mse", "nll"])
def test_colar_loss_all_terms_finite_with_grads(tiny_model: CoLaRModel, kind: str) -> None:
  batch = {k: jnp.asarray(v) for k, v in sft_batch(np.random.default_rng(4)).items()}
  run = config.from_config_dict(
    config.apply_overrides(
      config.base_config(),
      [
        f"colar.embed_modeling_loss={kind}",
        "colar.entropy_weight=0.01",
        "colar.pred_embed_forward_weight=0.5",
      ],
    )
  )
  settings = methods.get("colar").loss_settings(run, 0.02)  # what the trainer passes
  assert settings == ColarSettings(
    colar=config.Colar(
      embed_modeling_loss=kind, entropy_weight=0.01, pred_embed_forward_weight=0.5
    ),
    embed_std=0.02,
  )
  graphdef, state = nnx.split(tiny_model)

  def f(st):
    return methods.get("colar").loss(
      nnx.merge(graphdef, st), batch, jax.random.key(1), c=3, settings=settings
    )

  (total, m), grads = jax.jit(jax.value_and_grad(f, has_aux=True))(state)
  assert all(np.isfinite(float(v)) for v in m.values())
  expect = (
    m["ce_loss"]
    + m["embed_modeling_loss"]
    + 0.01 * m["entropy"]
    + 0.5 * m["pred_embed_forward_loss"]
  )
  np.testing.assert_allclose(float(total), float(expect), rtol=1e-5)
  # Compressed positions: 1 + ceil((n-1)/3) for chain lengths 11, 4, 1, 8.
  assert float(m["n_latent"]) == pytest.approx((5 + 2 + 1 + 4) / 4)
  g = nnx.to_pure_dict(grads)
  assert float(jnp.abs(g["latent_head"]["mean"]["kernel"]).sum()) > 0
  assert float(jnp.abs(g["lm"]["embed"]["embedding"]).sum()) > 0


def test_end_latent_loss_off_ignores_the_answer_embedding(tiny_model: CoLaRModel) -> None:
  """The last compressed position's latent target is the answer's first embedding; with
  ``end_latent_loss`` off, changing that token leaves the latent loss unchanged (and on,
  it does not: the switch really removes that one position)."""
  batch = {k: jnp.asarray(v) for k, v in sft_batch(np.random.default_rng(5)).items()}
  other = dict(batch, answer_ids=batch["answer_ids"].at[:, 0].set(SEP + 1))
  graphdef, state = nnx.split(tiny_model)

  def em(settings, b):
    _, m = colar_loss(nnx.merge(graphdef, state), b, jax.random.key(2), c=2, settings=settings)
    return float(m["embed_modeling_loss"]), float(m["ce_loss"])

  on, off = ColarSettings(), ColarSettings(colar=config.Colar(end_latent_loss=False))
  assert em(on, batch)[0] != pytest.approx(em(on, other)[0], rel=1e-4)
  assert em(off, batch)[0] == pytest.approx(em(off, other)[0], rel=1e-6)
  assert em(off, batch)[1] != pytest.approx(em(off, other)[1], rel=1e-4)  # CE still sees it
