"""Table-1 baselines (nocot / icot / coconut / distill): curricula, encodings, the Coconut
thought recurrence, CODI loss terms against a direct recomputation, and a few train steps
+ decoding per method through the shared step and rollout (tiny model, char tokenizer)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import Mesh

from colar_jax import config, methods
from colar_jax.data import prompts
from colar_jax.data.records import Record
from colar_jax.decode import rollout as R
from colar_jax.decode.generate import method_rollout_config
from colar_jax.methods import curriculum
from colar_jax.methods.coconut import coconut_layout, n_thoughts
from colar_jax.methods.distill import distill_terms, hidden_distill_loss
from colar_jax.methods.thoughts import thought_pass
from colar_jax.model import CoLaRModel, ModelConfig
from colar_jax.model import sharding as shd
from colar_jax.train import run as run_lib
from colar_jax.train import state as ts
from colar_jax.weights import convert

CFG = ModelConfig(
  vocab_size=40,
  hidden_size=64,
  num_layers=2,
  num_heads=4,
  num_kv_heads=2,
  head_dim=16,
  intermediate_size=128,
)
PROJ = CFG.replace(latent_proj_size=64)
TEMPLATES = prompts.PromptTemplates(question="Q{}", speed="({})", answer="A:{}")
BUCKETS = prompts.Buckets(question=(8, 16), steps=(8, 16, 24), answer=(8,))
RECORDS = [
  Record("1+2*3", ("1+2=3", "3*3=9"), "9"),
  Record("4-1", ("4-1=3",), "3"),
  Record("2*2+1", ("2*2=4", "4+1=5", "5*1=5"), "5"),
  Record("7", (), "7"),
]
BASELINES = ("nocot", "icot", "coconut", "distill")


def _run_config() -> config.Run:
  """The typed run: both curricula 2 epochs per stage, stages 1..3; Coconut 2 thoughts a
  step (with its optional projection); Distill 6 thoughts, weights 1 / 0.5 / 2."""
  c = config.base_config()
  for cur in (c.baselines.icot, c.baselines.coconut.curriculum):
    cur.epochs_per_stage, cur.start_stage, cur.max_stage = 2, 1, 3
  c.baselines.coconut.n_latents_per_step = 2
  c.baselines.coconut.use_proj = True
  d = c.baselines.distill
  d.n_latents, d.alpha, d.beta, d.gamma = 6, 1.0, 0.5, 2.0
  return config.from_config_dict(c)


RUN = _run_config()
# Thoughts each latent method decodes with, written out (not read from the methods):
# Coconut: final stage 3 x 2 per step; Distill: n_latents.
EVAL_LATENTS = dict(nocot=0, icot=0, coconut=6, distill=6)


# Tests compile far more than they compute: cheap XLA options halve compile time.
FAST = dict(xla_backend_optimization_level=0, xla_llvm_disable_expensive_passes=True)


def fast_jit(fn, *args, **static):
  """``fn`` jitted and compiled for ``args`` with :data:`FAST`; call with ``args`` only."""
  jitted = fn if hasattr(fn, "lower") else jax.jit(fn)
  return jitted.lower(*args, **static).compile(compiler_options=FAST)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  t = prompts.train_char_tokenizer(
    prompts.char_tokenizer_corpus(RECORDS), tmp_path_factory.mktemp("tok"), templates=TEMPLATES
  )
  assert len(t) <= CFG.vocab_size
  return t


def encode(tok, method: str, epoch: int = 0) -> dict[str, np.ndarray]:
  m = methods.get(method)
  ctx = methods.EncodeContext(tok, TEMPLATES, BUCKETS)
  return m.encode(RUN, list(RECORDS), ctx, speed=prompts.Speed(1), stage=m.stage(RUN, epoch))


def dec(tok, ids, mask) -> str:
  return tok.decode([int(i) for i, m in zip(ids, mask) if m], skip_special_tokens=False)


# ----------------------------------------------------------------------------
# Curricula and encodings
# ----------------------------------------------------------------------------
def test_stage_schedule_by_epoch():
  cur = config.Curriculum(epochs_per_stage=2, start_stage=1, max_stage=3)
  table = {0: 1, 1: 1, 2: 2, 3: 2, 4: 3, 5: 3, 9: 3}
  assert {e: curriculum.stage_of(cur, e) for e in table} == table
  # The reference's ceil(epoch + 1 / n) advances every epoch, whatever n.
  assert [math.ceil(e + 1 / 2) for e in range(4)] == [1, 2, 3, 4]
  assert [curriculum.stage_of(config.Curriculum(3, 0, 2), e) for e in range(8)] == [
    0,
    0,
    0,
    1,
    1,
    1,
    2,
    2,
  ]
  # k = steps removed from a 3-step / 1-step chain: stage, capped; all at the last stage.
  assert [curriculum.steps_removed(cur, s, 3) for s in (0, 1, 2, 3)] == [0, 1, 2, 3]
  assert [curriculum.steps_removed(cur, s, 5) for s in (1, 2, 3)] == [1, 2, 5]
  assert [curriculum.steps_removed(cur, s, 1) for s in (1, 2, 3)] == [1, 1, 1]
  assert [curriculum.is_final(cur, s) for s in (0, 1, 2, 3, 4)] == [False] * 3 + [True] * 2
  with pytest.raises(ValueError, match="epoch"):
    curriculum.stage_of(cur, -1)
  # The methods read their own section: icot / coconut follow it, the others have none.
  coconut = methods.get("coconut")
  assert [coconut.stage(RUN, e) for e in (0, 2, 4, 6)] == [1, 2, 3, 3]
  assert [methods.get("icot").stage(RUN, e) for e in (0, 2, 4, 6)] == [1, 2, 3, 3]
  assert [methods.get(m).stage(RUN, 4) for m in ("nocot", "distill")] == [0, 0]
  assert [n_thoughts(RUN.baselines.coconut, coconut.stage(RUN, e)) for e in (0, 2, 4)] == [2, 4, 6]
  for method in BASELINES:
    got = methods.get(method).rollout_overrides(RUN, 0).get("max_latent_steps", 0)
    assert got == EVAL_LATENTS[method], method
  # Bad curricula are refused when the typed run is built, naming the key.
  for section in ("icot", "coconut.curriculum"):
    c = config.base_config()
    node = c.baselines.icot if section == "icot" else c.baselines.coconut.curriculum
    node.epochs_per_stage = 0
    with pytest.raises(config.ConfigError, match=f"baselines.{section}.epochs_per_stage"):
      config.from_config_dict(c)
    node.epochs_per_stage, node.start_stage = 1, 4  # start_stage > max_stage (3)
    with pytest.raises(config.ConfigError, match=f"baselines.{section}.start_stage"):
      config.from_config_dict(c)
  # Defaults of the config section (and the projection follows the method).
  c = config.base_config()
  run = config.from_config_dict(c)
  co = run.baselines.coconut
  assert n_thoughts(co, co.curriculum.max_stage) == 6 and run.baselines.distill.n_latents == 6
  assert methods.get("coconut").rollout_overrides(run, 0)["max_latent_steps"] == 6
  assert methods.get("distill").rollout_overrides(run, 0)["max_latent_steps"] == 6
  assert run_lib.model_config(run).latent_proj_size == 0
  c.method = "distill"
  assert run_lib.model_config(config.from_config_dict(c)).latent_proj_size == (
    c.model.arch.hidden_size
  )
  c.method = "coconut"
  assert run_lib.model_config(config.from_config_dict(c)).latent_proj_size == 0
  c.baselines.coconut.use_proj = True  # Coconut's optional projection
  assert run_lib.model_config(config.from_config_dict(c)).latent_proj_size == (
    c.model.arch.hidden_size
  )
  c.baselines.proj_hidden_size = 48
  assert run_lib.model_config(config.from_config_dict(c)).latent_proj_size == 48


def test_icot_and_nocot_encodings(tok):
  sep = TEMPLATES.separator
  expected = {  # epoch -> remaining chain per row (stage 1, 2, final)
    0: [f"{sep}3*3=9", "", f"{sep}4+1=5\n5*1=5", ""],
    2: ["", "", f"{sep}5*1=5", ""],
    4: None,
  }
  for epoch, want in expected.items():
    b = encode(tok, "icot", epoch)
    assert (b["stage"] == methods.get("icot").stage(RUN, epoch)).all()
    if want is None:  # final stage: no chain at all, for every row
      assert b["steps_ids"].shape == (4, 0)
    else:
      got = [dec(tok, i, m) for i, m in zip(b["steps_ids"], b["steps_mask"])]
      assert got == want
  nb = encode(tok, "nocot")
  assert nb["steps_ids"].shape == (4, 0)
  assert dec(tok, nb["answer_ids"][0], nb["answer_mask"][0]) == f"{sep}A:9<eos>"
  # The question part IS the evaluation prompt (same ids as encode_prompt_batch).
  for method in BASELINES:
    spec = methods.get(method).prompt
    ev = prompts.encode_prompt_batch(
      [r.question for r in RECORDS],
      tok,
      TEMPLATES,
      spec.speed,
      BUCKETS,
      append_separator=spec.separator,
    )
    b = encode(tok, method)
    np.testing.assert_array_equal(b["question_ids"], ev["question_ids"])
    np.testing.assert_array_equal(b["question_mask"], ev["question_mask"])
    # The pipeline's encode_fn (stage from the epoch) encodes the same batch.
    enc_fn = methods.MethodEncoder(
      methods.get(method), RUN, methods.EncodeContext(tok, TEMPLATES, BUCKETS)
    )
    for epoch in (0, 2, 4):
      jax.tree.map(
        np.testing.assert_array_equal,
        enc_fn(list(RECORDS), prompts.Speed(1), epoch),
        encode(tok, method, epoch),
      )


def test_coconut_positions_and_label_mask(tok):
  sep = TEMPLATES.separator
  for epoch, n_lat, chains in ((0, 2, [f"{sep}3*3=9", "", f"{sep}4+1=5\n5*1=5", ""]), (4, 6, None)):
    b = encode(tok, "coconut", epoch)
    assert b["latent_mask"].shape == (4, n_lat)
    assert dec(tok, b["question_ids"][0], b["question_mask"][0]) == f"Q1+2*3(auto){sep}"
    if chains is None:
      assert b["steps_ids"].shape == (4, 0)
    else:
      assert [dec(tok, i, m) for i, m in zip(b["steps_ids"], b["steps_mask"])] == chains
    mask, labels, label_mask, n = coconut_layout(jax.tree.map(jnp.asarray, b))
    mask, labels, label_mask = map(np.asarray, (mask, labels, label_mask))
    assert n == n_lat
    p = b["question_ids"].shape[1]
    text_mask = np.concatenate([b["steps_mask"], b["answer_mask"]], 1).astype(bool)
    text_ids = np.concatenate([b["steps_ids"], b["answer_ids"]], 1)
    assert mask.shape == (4, p + n_lat + text_mask.shape[1])
    latent = np.zeros_like(mask)
    latent[:, p : p + n_lat] = True
    pad = ~mask
    assert mask[latent].all() and not label_mask[latent | pad].any()  # thoughts + pads
    assert not label_mask[:, :p].any()  # the prompt
    for row in range(4):
      real = np.flatnonzero(text_mask[row])
      # Every real text token is supervised but the end-of-thinking separator.
      assert text_ids[row, real[0]] == prompts.separator_id(tok, TEMPLATES)
      want = np.zeros(text_mask.shape[1], bool)
      want[real[1:]] = True
      np.testing.assert_array_equal(label_mask[row, p + n_lat :], want)
      np.testing.assert_array_equal(labels[row, p + n_lat :][want], text_ids[row][want])
    n_text = int(text_mask.sum()) - 4
    assert int(label_mask.sum()) == n_text


# ----------------------------------------------------------------------------
# Thought recurrence and the CODI terms
# ----------------------------------------------------------------------------
def _full(model, embeds, mask):
  """Plain forward, no cache: (hidden, all_hidden, logits)."""
  out = model.lm(inputs_embeds=embeds, attention_mask=mask, logits=True, output_all_hidden=True)
  return out.hidden, out.all_hidden, out.logits


def test_thought_pass_feeds_back_last_hidden_state(tok):
  """Coconut without projection (Distill's projected thoughts: the test below)."""
  model = CoLaRModel(CFG, rngs=nnx.Rngs(1))
  b = jax.tree.map(jnp.asarray, encode(tok, "coconut", 0))
  n = b["latent_mask"].shape[1]
  text = jnp.concatenate([b["steps_ids"], b["answer_ids"]], 1)
  text_mask = jnp.concatenate([b["steps_mask"], b["answer_mask"]], 1)

  def run(m, q, qm, t, tm):
    tp = thought_pass(m, q, qm, n, t, tm)
    # One full forward (no cache) over [prompt | the thoughts fed | text].
    embeds = jnp.concatenate(
      [m.lm.embed_tokens(q), tp.thoughts.astype(jnp.float32), m.lm.embed_tokens(t)], 1
    )
    return tp, _full(m, embeds, tp.mask)[0]

  args = (model, b["question_ids"], b["question_mask"], text, text_mask)
  tp, hidden = fast_jit(run, *args)(*args)
  np.testing.assert_allclose(
    np.where(tp.mask[..., None], tp.hidden, 0), np.where(tp.mask[..., None], hidden, 0), atol=2e-5
  )
  # Thought i is the last hidden state at the position before it.
  p = b["question_ids"].shape[1]
  np.testing.assert_allclose(tp.thoughts, hidden[:, p - 1 : p - 1 + n], atol=2e-5)
  assert n == 2 and tp.hidden.shape[1] == p + n + text.shape[1]


def _ce_np(logits, ids, mask, start):
  """Mean CE of real tokens >= start, each predicted from the previous REAL position."""
  logp = np.asarray(jax.nn.log_softmax(logits, -1))
  tot, cnt = 0.0, 0
  for r in range(ids.shape[0]):
    real = np.flatnonzero(mask[r])
    for j in range(1, len(real)):
      if real[j] >= start[r]:
        tot -= logp[r, real[j - 1], ids[r, real[j]]]
        cnt += 1
  return tot / cnt


def test_distill_terms_equal_direct_recomputation(tok):
  model = CoLaRModel(PROJ, rngs=nnx.Rngs(2))
  hb = encode(tok, "distill")
  b = jax.tree.map(jnp.asarray, hb)
  p, s = hb["question_ids"].shape[1], hb["steps_ids"].shape[1]
  n = hb["latent_mask"].shape[1]
  idx = hb["answer_pred_index"]
  sep = prompts.separator_id(tok, TEMPLATES)
  for r in range(4):  # the distilled answer token is the ':' of "###A:"
    row = hb["answer_ids"][r]
    assert row[0] == sep and tok.convert_ids_to_tokens(int(row[idx[r]])) == ":"
    assert tok.decode([int(row[idx[r] + 1])]) == RECORDS[r].answer[0]
  t_ids = np.concatenate([hb["question_ids"], hb["steps_ids"], hb["answer_ids"]], 1)
  t_mask = np.concatenate([hb["question_mask"], hb["steps_mask"], hb["answer_mask"]], 1)
  s_ids = np.concatenate([hb["question_ids"], np.zeros((4, n), np.int32), hb["answer_ids"]], 1)
  s_mask = np.concatenate([hb["question_mask"], np.ones((4, n)), hb["answer_mask"]], 1)
  pad = t_ids.shape[1] - s_ids.shape[1]  # right-pad the student: one forward program

  def run(m, batch, t_ids, t_mask, s_mask):
    t = distill_terms(m, batch, RUN.baselines.distill)
    lm = m.lm
    emb = jnp.concatenate(
      [
        lm.embed_tokens(batch["question_ids"]),
        t.thoughts,
        lm.embed_tokens(batch["answer_ids"]),
        jnp.zeros((4, pad, CFG.hidden_size)),
      ],
      1,
    )
    # Teacher rows 0-3 and student rows 4-7 in one batch (rows are independent).
    out = _full(
      m, jnp.concatenate([lm.embed_tokens(t_ids), emb]), jnp.concatenate([t_mask, s_mask])
    )
    return t, (
      out[0].reshape(2, 4, *out[0].shape[1:]),
      jnp.moveaxis(out[1].reshape(out[1].shape[0], 2, 4, *out[1].shape[2:]), 1, 0),
      out[2].reshape(2, 4, *out[2].shape[1:]),
    )

  s_mask_p = np.pad(s_mask, ((0, 0), (0, pad))).astype(bool)
  args = (model, b, jnp.asarray(t_ids), jnp.asarray(t_mask, bool), jnp.asarray(s_mask_p))
  t, (hid, all_h, logits) = fast_jit(run, *args)(*args)
  # Teacher: plain CoT sequence, CE on every real token after the prompt.
  t_ce = _ce_np(logits[0], t_ids, t_mask, np.full(4, p))
  # Student: [prompt | thoughts | answer]; CE on the answer after its separator.
  s_ce = _ce_np(logits[1][:, : s_ids.shape[1]], s_ids, s_mask, np.full(4, p + n + 1))
  # Smooth-L1 over layers 1..L at the answer-predicting token, mean over everything.
  th = np.stack([np.asarray(all_h[0])[1:, r, p + s + idx[r]] for r in range(4)], 1)
  st = np.stack([np.asarray(all_h[1])[1:, r, p + n + idx[r]] for r in range(4)], 1)
  d = np.abs(st - th)
  dist = np.where(d < 1, 0.5 * d * d, d - 0.5).mean()
  np.testing.assert_allclose(float(t.teacher_ce), t_ce, rtol=1e-4)
  np.testing.assert_allclose(float(t.student_ce), s_ce, rtol=1e-4)
  np.testing.assert_allclose(float(t.distill), dist, rtol=1e-4)
  np.testing.assert_allclose(t.teacher_hidden, th, atol=2e-5)
  np.testing.assert_allclose(t.student_hidden, st, atol=2e-5)
  assert float(t.distill) > 0
  # The student's thoughts: latent_proj of the last hidden state one position earlier.
  prev = hid[1][:, p - 1 : p - 1 + n]
  np.testing.assert_allclose(t.thoughts, model.latent_proj(prev), atol=2e-5)


def test_distillation_moves_only_the_student():
  x = jax.random.normal(jax.random.key(0), (2, 3, 8))
  y = jax.random.normal(jax.random.key(1), (2, 3, 8))
  for div_std in (False, True):
    gs, gt = jax.jit(jax.grad(lambda s, t: hidden_distill_loss(s, t, div_std), (0, 1)))(x, y)
    assert float(jnp.abs(gt).max()) == 0.0 and float(jnp.abs(gs).max()) > 0
  x, y = np.asarray(x), np.asarray(y)
  d = np.abs(x - y)
  sl1 = np.where(d < 1, 0.5 * d * d, d - 0.5)
  want = np.mean([sl1[l].mean() / np.std(y[l], ddof=1) for l in range(2)])
  np.testing.assert_allclose(float(hidden_distill_loss(x, y, True)), want, rtol=1e-5)


# ----------------------------------------------------------------------------
# Training through the shared step, decoding through the shared rollout
# ----------------------------------------------------------------------------
def _train(
  model: CoLaRModel, batch: dict, method: str, steps: int, settings
) -> tuple[list, CoLaRModel]:
  """``steps`` train steps of ``method`` on one repeated batch (the shared jitted step),
  with the method's static loss ``settings``."""
  mesh = Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1), shd.MESH_AXES)
  rules = shd.DEFAULT_RULES
  graphdef, p_state, frozen = nnx.split(model, ts.trainable_filter(False), ...)
  params = nnx.to_pure_dict(p_state)
  tx = optax.adam(3e-3)
  shardings = ts.state_shardings(tx, params, ts.param_shardings(p_state, mesh, rules), mesh)
  state = ts.init_train_state(params, tx, 0, shardings)
  step, _ = ts.compile_steps(graphdef, tx, settings, shardings)
  dev = ts.put_batch(batch, mesh, rules)
  step = fast_jit(step, state, frozen, dev, method=method, c=1)
  metrics = []
  for _ in range(steps):
    state, m = step(state, frozen, dev)
    metrics.append(m)
  assert int(state.nonfinite_step) == -1
  return jax.device_get(metrics), ts.merge_model(graphdef, state.params, frozen)


@pytest.mark.parametrize(
  "method,epoch", [("nocot", 0), ("icot", 2), ("coconut", 0), ("distill", 0)]
)
def test_method_trains_and_decodes(tok, method, epoch):
  # Coconut with its optional projection: it then decodes with the very program Distill
  # uses (same graphdef and RolloutConfig), as No-CoT / iCoT share theirs (compile time).
  cfg = PROJ if method in ("coconut", "distill") else CFG
  batch = encode(tok, method, epoch)
  meth = methods.get(method)
  model = CoLaRModel(cfg, rngs=nnx.Rngs(0))
  assert meth.projection_size(RUN, cfg.hidden_size) == cfg.latent_proj_size
  settings = meth.loss_settings(RUN, convert.compute_embed_std(model.lm))
  if method == "distill":  # Distill's weights come from its config section, nothing else
    assert settings == config.Distill(n_latents=6, alpha=1.0, beta=0.5, gamma=2.0)
  metrics, model = _train(model, batch, method, 12, settings)
  losses = [float(m["loss"]) for m in metrics]
  assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3]), losses
  if method == "distill":
    m = metrics[0]
    np.testing.assert_allclose(
      m["loss"], m["teacher_loss"] + 0.5 * m["student_loss"] + 2.0 * m["distill_loss"], rtol=1e-5
    )
  spec = meth.prompt  # the very prompt the batch above was trained on
  enc = prompts.encode_prompt_batch(
    [r.question for r in RECORDS],
    tok,
    TEMPLATES,
    spec.speed,
    BUCKETS,
    append_separator=spec.separator,
  )
  base = R.RolloutConfig(
    separator_id=prompts.separator_id(tok, TEMPLATES),
    eos_id=tok.eos_token_id,
    pad_id=tok.pad_token_id,
    max_new_tokens=6,
    greedy=True,
  )
  rc = method_rollout_config(base, method, RUN, cfg)  # what evaluation decodes with
  n_lat = EVAL_LATENTS[method]
  assert rc.latent_mode == ("hidden" if n_lat else "none")
  assert rc.num_latents == n_lat
  graphdef, state = nnx.split(model)
  out = jax.device_get(
    R.rollout(
      graphdef,
      state,
      enc["question_ids"],
      enc["question_mask"],
      jax.random.key(0),
      rc,
      batch_buckets=None,
    )
  )
  assert out.answer_ids.shape == (4, 6)
  assert out.latents.shape == (4, n_lat, cfg.hidden_size)
  np.testing.assert_array_equal(out.num_latents, np.full(4, n_lat))
  if cfg.latent_proj_size:  # the first thought is latent_proj(prompt's last hidden state)
    assert rc.projection == "latent_proj"
    h = model.lm(
      jnp.asarray(enc["question_ids"]),
      attention_mask=jnp.asarray(enc["question_mask"], bool),
      logits=False,
    ).hidden
    np.testing.assert_allclose(out.latents[:, 0], model.latent_proj(h[:, -1]), atol=1e-4)


def test_latent_proj_is_trainable_and_off_by_default():
  model = CoLaRModel(PROJ.replace(lora_rank=2), rngs=nnx.Rngs(0))
  _, params, _ = ts.split_model(model, lora=True)  # LoRA: adapters + non-LM modules
  assert set(params["latent_proj"]) == {"fc1", "fc2", "norm"}
  plain = nnx.to_pure_dict(nnx.state(CoLaRModel(CFG, rngs=nnx.Rngs(0))))
  assert set(plain) == {"lm", "latent_head"}  # other methods' trees are unchanged
