"""``gs://`` paths stay URLs through the workdir, checkpoint, data-dir, model-dir, export,
training-log and eval code: a fake ``gs://`` backend (a local dir, every call recorded, no
network) stands in for GCS, and ``os.path`` / ``open`` / ``os`` calls that receive a URL
fail the test."""

from __future__ import annotations

import builtins
import dataclasses
import functools
import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from etils.epath import backend as backend_lib
from etils.epath import gpath
from flax import nnx
from helpers import tiny_run
from orbax.checkpoint._src.path import gcs_utils
from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils

from colar_jax import cli, config, paths
from colar_jax.data import prompts
from colar_jax.model import CoLaRModel, ModelConfig
from colar_jax.train import hooks, logs, sft
from colar_jax.train import run as run_lib
from colar_jax.train import workdir as workdir_lib
from colar_jax.weights import checkpoints, export

OS = backend_lib.os_backend


class FakeGCS(backend_lib.Backend):
  """``gs://bucket/x`` -> ``<root>/bucket/x`` on local disk; records (call, path)."""

  def __init__(self, root: str) -> None:
    self.root, self.calls = root, []

  def local(self, p) -> str:
    p = os.fspath(p)
    assert p.startswith("gs://"), p
    return os.path.join(self.root, p[len("gs://") :])

  def url(self, p) -> str:
    return "gs://" + os.path.relpath(os.fspath(p), self.root)

  def _rec(self, name, p):
    self.calls.append((name, os.fspath(p)))
    return self.local(p)

  def open(self, path, mode):
    return OS.open(self._rec("open", path), mode)

  def exists(self, path):
    return OS.exists(self._rec("exists", path))

  def isdir(self, path):
    return OS.isdir(self._rec("isdir", path))

  def listdir(self, path):
    return OS.listdir(self._rec("listdir", path))

  def glob(self, path):
    return [self.url(p) for p in OS.glob(self._rec("glob", path))]

  def walk(self, top, *, top_down=True, on_error=None):
    for d, ds, fs in OS.walk(self._rec("walk", top), top_down=top_down, on_error=on_error):
      yield self.url(d), ds, fs

  def makedirs(self, path, *, exist_ok=False, mode=None):
    return OS.makedirs(self._rec("makedirs", path), exist_ok=exist_ok, mode=mode)

  def mkdir(self, path, *, exist_ok=False, mode=None):
    return OS.mkdir(self._rec("mkdir", path), exist_ok=exist_ok, mode=mode)

  def rmtree(self, path):
    return OS.rmtree(self._rec("rmtree", path))

  def remove(self, path):
    return OS.remove(self._rec("remove", path))

  def rename(self, path, dst):
    return OS.rename(self._rec("rename", path), self.local(dst))

  def replace(self, path, dst):
    return OS.replace(self._rec("replace", path), self.local(dst))

  def copy(self, path, dst, overwrite):
    src = self.local(path) if os.fspath(path).startswith("gs://") else os.fspath(path)
    self.calls.append(("copy", os.fspath(dst)))
    return OS.copy(src, self.local(dst), overwrite=overwrite)

  def stat(self, path):
    return OS.stat(self._rec("stat", path))


def _mangles(*args) -> bool:
  return any(isinstance(a, (str, os.PathLike)) and "gs:/" in os.fspath(a) for a in args)


@pytest.fixture
def gcs(tmp_path, monkeypatch):
  """The fake backend for ``gs://``, and a recorder on the ``os`` / ``os.path`` / ``open``
  calls that must never see a URL (they would mangle it or look on local disk)."""
  fake = FakeGCS(str(tmp_path / "gcs"))
  os.makedirs(fake.root)
  monkeypatch.setitem(gpath._PREFIX_TO_BACKEND, "gs", fake)
  monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)
  bad: list[tuple[str, tuple]] = []

  def guard(mod, name):
    orig = getattr(mod, name)

    def wrapped(*a, **kw):
      if _mangles(*a):
        bad.append((name, a))
      return orig(*a, **kw)

    monkeypatch.setattr(mod, name, wrapped)

  for name in ("abspath", "normpath", "realpath", "relpath", "isdir", "isfile", "exists"):
    guard(os.path, name)
  for name in ("getsize", "expanduser"):
    guard(os.path, name)
  for name in ("listdir", "makedirs", "replace", "rename", "remove", "walk", "mkdir", "stat"):
    guard(os, name)
  guard(builtins, "open")
  fake.bad = bad
  yield fake
  assert not bad, f"os calls on a URL: {bad[:5]}"


def test_path_helpers_keep_urls():
  assert paths.absolute("gs://b/run/./x/../y") == "gs://b/run/y"
  assert paths.join("gs://b/run", "checkpoints", "3") == "gs://b/run/checkpoints/3"
  assert paths.parent("gs://b/runs/a") == "gs://b/runs"
  assert paths.relative("gs://b/x/cot/checkpoints/2", "gs://b/x/colar") == "../cot/checkpoints/2"
  assert paths.resolve_relative("../cot/checkpoints/2", "gs://b/x/colar") == (
    "gs://b/x/cot/checkpoints/2"
  )
  assert paths.relative("gs://other/cot", "gs://b/colar") is None  # another bucket
  assert paths.relative("/local/cot", "gs://b/colar") is None
  assert paths.absolute("rel/dir") == os.path.join(os.getcwd(), "rel", "dir")


def test_workdir_checkpoints_and_inputs_on_gs(gcs, caplog):
  run = tiny_run.run_config("gs://bkt/data")
  wd = "gs://bkt/runs/a"
  with caplog.at_level(logging.WARNING), workdir_lib.claim(run, wd) as got:
    assert got == wd  # not <cwd>/gs:/bkt/runs/a
  assert os.path.isdir(gcs.local(wd))
  assert any("not locked" in r.getMessage() for r in caplog.records)
  assert ("makedirs", wd) in gcs.calls or ("mkdir", wd) in gcs.calls

  # A resumed workdir: a complete step and the saved config, read through the backend.
  os.makedirs(gcs.local(wd + "/checkpoints/2/meta"))
  os.makedirs(gcs.local(wd + "/checkpoints/4.orbax-checkpoint-tmp-1"))  # incomplete
  config.save_json(run, gcs.local(wd + "/config.json"))
  assert checkpoints.last_complete_step(wd) == 2
  assert checkpoints.step_dirs(wd) == [wd + "/checkpoints/2"]
  assert checkpoints.resolve(wd) == (wd + "/checkpoints", 2)
  changed = dataclasses.replace(run, seed=run.seed + 1)
  with pytest.raises(config.ConfigError, match="config.seed changed"):
    with workdir_lib.claim(changed, wd):
      pass
  with workdir_lib.claim(changed, wd, allow_config_change=True):
    workdir_lib.record_changes(wd)  # appended through the backend (as hooks.start does)
  lines = open(gcs.local(wd + "/config_changes.jsonl")).read().splitlines()
  assert json.loads(lines[-1])["changes"]["seed"] == [run.seed, run.seed + 1]

  assert (
    run_lib.data_dir_of(
      dataclasses.replace(run, data=dataclasses.replace(run.data, data_dir="")), wd
    )
    == "gs://bkt/runs/data"
  )

  hf = "gs://bkt/models/tiny"
  with_hf = dataclasses.replace(run, model=dataclasses.replace(run.model, hf_dir=hf))
  with pytest.raises(config.ConfigError, match=f"config.model.hf_dir: {hf} is not a directory"):
    run_lib.check_inputs(with_hf)
  os.makedirs(gcs.local(hf))
  with pytest.raises(config.ConfigError, match=f"{hf} has no config.json"):
    run_lib.check_inputs(with_hf)
  open(gcs.local(hf + "/config.json"), "w").write("{}")
  run_lib.check_inputs(with_hf)
  with pytest.raises(config.ConfigError, match="config.init_from: gs://bkt/none: no complete"):
    run_lib.check_inputs(dataclasses.replace(run, init_from="gs://bkt/none"))
  # A fingerprint through the backend equals the one of the same files on local disk.
  assert paths.fingerprint(hf) == paths.fingerprint(gcs.local(hf))
  ptr = paths.pointer(hf, wd)
  assert ptr["rel"] == "../../models/tiny" and ptr["path"] == hf
  found = run_lib.locate(ptr, wd, "model.hf_dir", "the converted base weights", "gs://bkt/gone")
  assert found == hf


def test_export_to_gs_and_read_back(gcs, tmp_path):
  tok_dir = tmp_path / "tok"
  prompts.train_char_tokenizer(["x=2;x*3?", "6"], tok_dir)
  tok = prompts.load_tokenizer(str(tok_dir))
  arch = dict(
    hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16
  )
  model = CoLaRModel(ModelConfig(vocab_size=len(tok), **arch), rngs=nnx.Rngs(0))
  dst = "gs://bkt/exports/a"
  out = export.export_model(
    model, dst, tokenizer_dir=str(tok_dir), info=dict(method="colar"), dtype="float32"
  )
  assert out["dst"] == dst
  assert os.path.isfile(gcs.local(dst + "/model.safetensors"))
  assert export.is_export(dst)
  info, heads = export.read_parts(dst)
  assert info["method"] == "colar"
  want = np.asarray(model.latent_head.fc1.kernel.value)
  np.testing.assert_array_equal(heads["latent_head"]["fc1"]["kernel"], want)
  assert jnp.asarray(want).shape == want.shape and jax.device_count() == 8


@pytest.mark.usefixtures("restore_logging")  # cli.main sets up logging
def test_sft_and_eval_with_a_gs_workdir(gcs, tmp_path, monkeypatch):
  """A tiny CoLaR run trains (checkpoints, metrics.jsonl, config) and evaluates (the
  result files) in a ``gs://`` workdir with no ``os`` / ``open`` call on the URL.
  TensorBoard is off (tensorboardX writes ``gs://`` with google-cloud-storage, not
  through epath); Orbax's TensorStore arrays go to the fake root's files (TensorStore
  has its own GCS client, which the fake backend cannot stand in for)."""
  monkeypatch.setattr(
    hooks, "MetricWriter", functools.partial(logs.MetricWriter, tensorboard=False)
  )
  orig = ts_utils.build_kvstore_tspec

  def local_kvstore(directory, *a, **kw):
    directory = os.fspath(directory)
    if directory.startswith("gs://"):
      directory = gcs.local(directory)
    return orig(directory, *a, **kw)

  monkeypatch.setattr(ts_utils, "build_kvstore_tspec", local_kvstore)
  # Orbax asks the real bucket whether it has a hierarchical namespace.
  monkeypatch.setattr(gcs_utils, "is_hierarchical_namespace_enabled", lambda p: False)
  wd = "gs://bkt/runs/colar"
  run = tiny_run.run_config(str(tmp_path / "data"))
  sft.train(run, wd)
  assert checkpoints.last_complete_step(wd) == 4
  assert sorted(os.listdir(gcs.local(wd + "/checkpoints"))) == ["2", "4"]
  with open(gcs.local(wd + "/" + logs.JSONL)) as f:  # the object the backend wrote
    steps = [json.loads(line)["step"] for line in f]
  assert steps == [1, 2, 3, 4]
  assert [r["step"] for r in logs.read_jsonl(wd)] == [1, 2, 3, 4]
  saved = config.from_config_dict(config.load_json(wd + "/config.json"))
  assert saved.train == run.train and saved.colar == run.colar
  assert any(name == "open" and p == wd + "/" + logs.JSONL for name, p in gcs.calls)

  out = "gs://bkt/evals/a"
  argv = ["eval", "--workdir", wd, "--compression", "2", "--seeds", "1", "--split", "val"]
  argv += ["--max_examples", "8", "--out_dir", out, "--no_progress"]
  assert cli.main(argv)["num_questions"] == 8
  result = json.loads(open(gcs.local(out + "/synthetic_val.json")).read())
  assert result["summary"] == out + "/synthetic_val.json" and result["num_questions"] == 8
  with open(gcs.local(out + "/synthetic_val.jsonl")) as f:
    assert len(f.read().splitlines()) == 8  # one record per question (1 seed, 1 factor)
  with open(gcs.local(out + "/synthetic_val.png"), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_metrics_jsonl_on_gs_is_rewritten_not_appended_and_resumes(gcs):
  """No append on object stores: each write is one whole-object write; a resume drops the
  lines after the restored step, as on local disk."""
  wd = "gs://bkt/runs/m"
  paths.makedirs(wd)  # (the fake is a local dir; workdir.claim makes it in a run)
  w = logs.MetricWriter(wd, tensorboard=False)
  w.start(None)
  for s in (1, 2, 3):
    w.write_lines([dict(kind="train", step=s, loss=float(s))])
  w.close()
  assert [r["step"] for r in logs.read_jsonl(wd)] == [1, 2, 3]
  assert ("open", wd + "/" + logs.JSONL) in gcs.calls
  w = logs.MetricWriter(wd, tensorboard=False)
  w.start(2)  # resumed from the step-2 checkpoint: step 3 was logged after it
  w.write_lines([dict(kind="train", step=3, loss=30.0)])
  w.close()
  assert [(r["step"], r["loss"]) for r in logs.read_jsonl(wd)] == [(1, 1.0), (2, 2.0), (3, 30.0)]
