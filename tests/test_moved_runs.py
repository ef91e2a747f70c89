"""A run chain (CoT -> CoLaR with LoRA on top of it) moved to another root still loads,
evaluates, generates, resumes and exports with the same numbers; a missing upstream is
one ``error:`` line naming the path and the key."""

from __future__ import annotations

import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tiny_run

from colar_jax import cli, config
from colar_jax.train import logs, sft
from colar_jax.train import run as run_lib
from colar_jax.weights import checkpoints

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IDS = np.asarray([[3, 5, 7, 9, 11, 13], [2, 4, 6, 8, 10, 12]], np.int32)


def _config(method: str, data_dir: str, **over) -> config.Run:
  c = config.load(os.path.join(REPO, "configs", "base.py") + f":tiny,{method}")
  c.unlock()
  flags = tiny_run.overrides(data_dir, **over)
  config.apply_overrides(c, [a[len("--config.") :] for a in flags])
  return config.from_config_dict(c)


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
  """root/{data, tree/cot, tree/colar}: CoT (2 steps, full FT), then CoLaR from it with
  LoRA adapters (4 steps, checkpoints at 2 and 4): its base lives only in the CoT run."""
  root = tmp_path_factory.mktemp("moved")
  data = str(root / "data")
  tree = root / "tree"
  cot = _config("cot", data, **{"train.num_steps": 2})
  sft.train(cot, str(tree / "cot"))
  colar = _config(
    "colar",
    data,
    **{"init_from": str(tree / "cot"), "model.lora_rank": 4, "model.lora_alpha": 8.0},
  )
  sft.train(colar, str(tree / "colar"))
  return root, colar


def _logits(workdir: str) -> np.ndarray:
  lr = run_lib.load_run(workdir)
  return np.asarray(lr.model.lm(jnp.asarray(IDS)).logits, np.float32)


def _eval(workdir: str, out: str) -> dict:
  return cli.main(
    [
      "eval",
      "--workdir",
      workdir,
      "--compression",
      "1",
      "--seeds",
      "1",
      "--split",
      "val",
      "--max_examples",
      "8",
      "--out_dir",
      out,
      "--no_progress",
    ]
  )


def _train_records(workdir: str) -> list[dict]:
  return logs.read_jsonl(workdir, "train")


@pytest.mark.usefixtures("restore_logging")
def test_a_moved_chain_loads_evaluates_generates_resumes_and_exports(chain, tmp_path, capsys):
  root, colar_cfg = chain
  old = root / "tree"
  meta = checkpoints.read_meta(str(old / "colar"))
  base = meta["base"]
  assert base["kind"] == "run" and base["rel"] == "../cot/checkpoints/2"
  assert (
    base["fingerprint"].startswith("sha256:") and base["tokenizer"]["rel"] == "../cot/tokenizer"
  )
  ref_logits = _logits(str(old / "colar"))
  ref_eval = _eval(str(old / "colar"), str(tmp_path / "eval_ref"))
  capsys.readouterr()
  cli.main(["generate", "--workdir", str(old / "colar"), "--seed", "1", "x=2;x*3?"])
  ref_gen = capsys.readouterr().out
  ref_train = _train_records(str(old / "colar"))
  assert [r["step"] for r in ref_train][-1] == 4

  new = tmp_path / "elsewhere" / "tree"
  new.parent.mkdir()
  shutil.move(str(old), str(new))  # the whole tree: nothing left at the recorded paths
  assert not old.exists()
  wd = str(new / "colar")

  np.testing.assert_array_equal(_logits(wd), ref_logits)
  got = _eval(wd, str(tmp_path / "eval_moved"))
  same = json.dumps(got["factors"], sort_keys=True) == json.dumps(
    ref_eval["factors"], sort_keys=True
  )
  assert same and got["num_questions"] == 8  # (json: NaN #L(correct) compares equal)
  capsys.readouterr()
  cli.main(["generate", "--workdir", wd, "--seed", "1", "x=2;x*3?"])
  assert capsys.readouterr().out == ref_gen

  # Resume: drop the last checkpoint and its log lines, train again from step 2 with the
  # config the run was started with (its init_from points at the old, gone place).
  shutil.rmtree(os.path.join(wd, "checkpoints", "4"))
  assert str(old / "cot") == colar_cfg.init_from
  sft.train(colar_cfg, wd)
  resumed = _train_records(wd)
  assert [r["step"] for r in resumed] == [r["step"] for r in ref_train]
  for a, b in zip(ref_train, resumed):
    assert a["loss"] == pytest.approx(b["loss"], abs=1e-6), a["step"]
  np.testing.assert_allclose(_logits(wd), ref_logits, atol=1e-6)
  after = checkpoints.read_meta(wd)
  assert after["base"]["checkpoint"] == str(new / "cot" / "checkpoints" / "2")

  summary = cli.main(["export", "--workdir", wd, str(tmp_path / "hf"), "--dtype", "float32"])
  assert summary["heads"]
  back = run_lib.load_run(str(tmp_path / "hf"))
  ours = np.asarray(back.model.lm(jnp.asarray(IDS)).logits, np.float32)
  np.testing.assert_allclose(ours, ref_logits, atol=1e-4)

  # The upstream gone (moved away alone): one error line naming the path and the key.
  shutil.move(str(new / "cot"), str(tmp_path / "cot_away"))
  with pytest.raises(SystemExit) as e:
    _eval(wd, str(tmp_path / "eval_gone"))
  msg = str(e.value.code)
  assert len(msg.splitlines()) == 1, msg
  assert msg.startswith("error: config.init_from: the upstream run's checkpoint"), msg
  assert str(new / "cot" / "checkpoints" / "2") in msg and "missing" in msg


def test_a_copied_upstream_with_other_weights_is_refused(chain, tmp_path):
  """The fingerprint: another run at the recorded place is not taken for the upstream."""
  root, _ = chain
  meta_ptr = dict(path="x", rel="other", fingerprint="sha256:" + "0" * 32)
  (tmp_path / "other").mkdir()
  (tmp_path / "other" / "f.json").write_text("{}")
  with pytest.raises(config.ConfigError, match=r"^config.init_from: .* is not the one"):
    run_lib.locate(meta_ptr, str(tmp_path), "init_from", "the upstream", str(tmp_path / "x"))
  ok = dict(meta_ptr, fingerprint=run_lib.paths.fingerprint(str(tmp_path / "other")))
  assert run_lib.locate(ok, str(tmp_path), "init_from", "u", "/nope") == str(tmp_path / "other")
  (tmp_path / "other" / "f.json").write_text('{"a": 1}')  # same name, other content
  with pytest.raises(config.ConfigError):
    run_lib.locate(ok, str(tmp_path), "init_from", "u", "/nope")
