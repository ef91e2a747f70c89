"""The logs people read: TensorBoard event files across a kill and resume (read back with
TensorBoard's own reader), the progress bars and summary lines, ``data prepare``'s count
of dropped records, and the optional W&B writer."""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import signal
import sys

import pytest
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from tensorboard.plugins.hparams import plugin_data_pb2
from test_train_sft import REPO, cli, run_args

from colar_jax import cli as cli_lib
from colar_jax import config
from colar_jax import evaluate as ev
from colar_jax.decode import generate as gen
from colar_jax.decode import rollout
from colar_jax.train import logs
from colar_jax.train import sft as train_sft

RUN = config.from_config_dict(config.base_config())
CONFIG = config.to_dict(RUN)


def tb_scalars(workdir: str, tag: str = "train/loss") -> list[tuple[int, float]]:
  """(step, value) of ``tag`` as TensorBoard shows it."""
  acc = event_accumulator.EventAccumulator(os.path.join(workdir, logs.TB_SUBDIR))
  acc.Reload()
  if tag not in acc.Tags()["scalars"]:
    return []
  return [(e.step, e.value) for e in acc.Scalars(tag)]


def raw_steps(workdir: str, tag: str = "train/loss") -> list[int]:
  """Every step of ``tag`` in the event files, in file order (no purging): what is on
  disk."""
  out = []
  for path in sorted(glob.glob(os.path.join(workdir, logs.TB_SUBDIR, "*tfevents*"))):
    for ev_ in EventFileLoader(path).Load():
      out += [ev_.step for v in ev_.summary.value if v.tag == tag]
  return out


def tb_config(workdir: str) -> tuple[dict, dict]:
  """(the config text as JSON, the hparams) that the event files carry."""
  acc = event_accumulator.EventAccumulator(
    os.path.join(workdir, logs.TB_SUBDIR), size_guidance={"tensors": 0}
  )
  acc.Reload()
  (text,) = {e.tensor_proto.string_val[0].decode() for e in acc.Tensors("config/text_summary")}
  cfg = json.loads("\n".join(line[4:] for line in text.splitlines()))
  content = acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
  ssi = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
  hp = {
    k: (v.number_value if v.WhichOneof("kind") == "number_value" else v.string_value)
    for k, v in ssi.hparams.items()
  }
  return cfg, hp


# ------------------------------------------------------------------------------ TensorBoard
def test_resume_drops_the_killed_tail_and_logs_the_config(tmp_path):
  wd = str(tmp_path)
  w = logs.MetricWriter(wd)
  w.start(None, CONFIG, RUN.train)
  for s in range(1, 6):
    w.scalars(s, {"train/loss": 10.0 + s})
  # Killed here (never closed), and in the middle of writing a record.
  (path,) = glob.glob(os.path.join(wd, logs.TB_SUBDIR, "*tfevents*"))
  with open(path, "ab") as f:
    f.write(b"\x40\x00\x00\x00\x00\x00\x00\x00\x01\x02")
  assert raw_steps(wd) == [1, 2, 3, 4, 5]  # every logged step is on disk before the kill

  w = logs.MetricWriter(wd)
  w.start(3, CONFIG, RUN.train)  # resumed from the step-3 checkpoint
  for s in range(4, 7):
    w.scalars(s, {"train/loss": 100.0 + s})
  w.close()
  assert tb_scalars(wd) == [(1, 11.0), (2, 12.0), (3, 13.0), (4, 104.0), (5, 105.0), (6, 106.0)]
  # The killed tail (4, 5) stays in the old file; the reader hides it (no duplicates).
  cfg, hp = tb_config(wd)
  assert cfg == json.loads(json.dumps(CONFIG))
  assert hp["train.num_steps"] == RUN.train.num_steps and hp["method"] == RUN.method
  assert hp["optim.lr"] == pytest.approx(RUN.optim.lr)

  # A fresh start in the same workdir (no checkpoint) keeps none of the old points.
  with open(os.path.join(wd, logs.JSONL), "w") as f:
    f.write(json.dumps({"kind": "val", "step": 0, "val/accuracy": 0.5}) + "\n")
  w = logs.MetricWriter(wd)
  w.start(None, CONFIG, RUN.train)
  w.scalars(1, {"train/loss": 7.0})
  w.close()
  assert tb_scalars(wd) == [(1, 7.0)]
  assert logs.read_jsonl(wd, "val") == []


def test_kill_and_resume_run_has_each_step_once(tmp_path):
  """A real run killed (SIGKILL) at step 4 after its step-2 checkpoint, then resumed."""
  wd = str(tmp_path / "run")
  args = run_args(
    str(tmp_path / "data"),
    **{
      "train.num_steps": 5,
      "train.ckpt_every": 2,
      "train.log_every": 1,
      "train.eval_every": 0,
    },
  )
  killed = cli(wd, args, env={train_sft.KILL_ENV: "4"})
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
  assert [s for s, _ in tb_scalars(wd)] == [1, 2, 3]  # step 3 was logged after the checkpoint
  resumed = cli(wd, args)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  got = tb_scalars(wd)
  assert [s for s, _ in got] == [1, 2, 3, 4, 5]
  jsonl = {r["step"]: r["loss"] for r in logs.read_jsonl(wd)}
  assert [v for _, v in got] == pytest.approx([jsonl[s] for s in range(1, 6)], rel=1e-6)
  cfg, hp = tb_config(wd)
  assert cfg["train"]["num_steps"] == 5 and hp["train.log_every"] == 1
  # The human summary replaces the raw dict.
  (line,) = [x for x in resumed.stdout.splitlines() if x.startswith("sft done:")]
  assert line.startswith("sft done: step 5 (3 this run, resumed at 2) in ")
  assert f"loss {jsonl[5]:.4g}" in line, line


# ---------------------------------------------------------------------- bars and summaries
def test_percentages_bars_and_summary_lines(tmp_path):
  assert logs.pct(0.974) == "97.4%" and logs.pct(float("nan")) == "n/a"
  assert logs.format_metrics({"val/loss": 0.123456, "val/accuracy": 0.5}) == (
    "val/accuracy 50.0%, val/loss 0.1235"
  )
  rl = {"reward": 0.625, "accuracy": 0.625, "num_latent": 3.14, "loss": 0.0}
  assert logs.bar_fields(rl, {"tokens_per_s": 10.0}) == "reward=0.625 acc=62.5% #L=3.1"
  assert logs.bar_fields({"loss": 0.123456}, {"tokens_per_s": 1234.4}) == ("loss=0.1235 tok/s=1234")
  p = logs.Progress(10, 0, enabled=True)
  p.update(2, rl, 100.0)
  assert p.bar.desc.startswith("rl") and "acc=62.5%" in str(p.bar)
  p.close()

  wd = str(tmp_path)
  w = logs.MetricWriter(wd, tensorboard=False)
  w.write_lines(
    [
      dict(kind="train", step=7, reward=0.5, accuracy=0.5, num_latent=2.0),
      dict(kind="train", step=8, reward=0.75, accuracy=0.75, num_latent=2.5),
      {"kind": "val", "step": 8, "val/accuracy": 0.974, "val/num_latent": 2.25},
    ]
  )
  assert logs.run_summary("rl", wd, 6, 4.0) == (
    "rl done: step 8 (2 this run, resumed at 6) in 4 s (0.50 steps/s); reward 0.75, "
    "accuracy 75.0%, num_latent 2.5; val at step 8: val/accuracy 97.4%, val/num_latent 2.25"
  )


def test_eval_bar_shows_running_accuracy_and_the_table_percent(capsys):
  questions, answers = ["q0", "q1", "q2", "q3"], ["10", "11", "12", "13"]

  def generate(qs, idx, c, seed):  # right on q0 and q2 only
    return [
      gen.Generation(
        text=f"###Answer:{answers[i] if i % 2 == 0 else -1}", num_latent=i, answer_length=2
      )
      for i in idx
    ]

  printed = []
  ev.evaluate(
    None,
    None,
    questions,
    answers,
    "colar",
    [2],
    1,
    2,
    rollout.RolloutConfig(separator_id=4, eos_id=2),
    run=RUN,
    generate_fn=generate,
    progress=True,
    log=printed.append,
  )
  err = capsys.readouterr().err
  assert "acc=50.0% #L=1.5" in err, err
  assert "50.00% +- 0.00" in printed[-1]


# ------------------------------------------------------------------------------ data prepare
@pytest.mark.usefixtures("restore_logging")  # cli.main sets up logging
def test_data_prepare_says_what_it_dropped_and_why(tmp_path, capsys):
  src = tmp_path / "gsm8k"
  src.mkdir()
  good = [
    json.dumps({"question": f"q{i}?", "answer": f"<<{i}+1={i + 1}>>\n#### {i + 1}"})
    for i in range(502)
  ]
  bad = [
    json.dumps({"question": "no chain?", "answer": "just text\n#### 5"}),  # empty chain
    json.dumps({"question": "x?", "answer": "<<1+1=2>>\n#### two"}),  # answer not a number
    "{not json",
  ]
  (src / "train.jsonl").write_text("\n".join(good[:250] + bad + good[250:]) + "\n")
  (src / "test.jsonl").write_text("\n".join(good[:2]) + "\n")
  argv = ["data", "prepare", "gsm8k", "--source", str(src), "--data_dir", str(tmp_path / "d")]
  for _ in range(2):  # preparing, then the prepared copy: the same report
    assert cli_lib.main([*argv, "--skip_bad"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[:3] == ["test: 2", "train: 2", "val: 500"]
    head, _, why = out[3].partition(": 3 of 507 records: ")
    assert head == "dropped" and sorted(why.split(", ")) == [
      "1 empty reasoning chain (no <<...>> equation; gsm8k drop_empty_chains)",
      "1 invalid JSON",
      "1 non-numeric answer",
    ], out
    assert any(x.strip().startswith(f"{src / 'train.jsonl'}:252:") for x in out[4:]), out


# ------------------------------------------------------------------------------------- W&B
def test_wandb_mode_is_checked():
  c = config.base_config()
  c.train.wandb_mode = "sometimes"
  with pytest.raises(config.ConfigError, match="train.wandb_mode"):
    config.from_config_dict(c)


@pytest.mark.usefixtures("restore_logging")
def test_wandb_enabled_but_missing_is_one_error_line(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
  with pytest.raises(SystemExit) as e:
    cli_lib.main(
      [
        "sft",
        f"--config={os.path.join(REPO, 'configs', 'base.py')}:tiny,colar",
        f"--workdir={tmp_path / 'run'}",
        "--config.train.wandb=true",
      ]
    )
  assert e.value.code == (
    "error: config.train.wandb: wandb is not installed (pip install wandb), or set "
    "--config.train.wandb=false"
  )
  assert not (tmp_path / "run").exists()  # nothing was set up


def test_wandb_offline_writes_a_run_dir_and_resumes_its_id(tmp_path, monkeypatch):
  pytest.importorskip("wandb")
  for k in ("WANDB_MODE", "WANDB_DIR", "WANDB_RUN_ID", "WANDB_API_KEY"):
    monkeypatch.delenv(k, raising=False)
  train = dataclasses.replace(RUN.train, wandb=True, wandb_project="t")
  wd = str(tmp_path)
  for start in (None, 1):
    w = logs.MetricWriter(wd, tensorboard=False)
    w.start(start, CONFIG, train)
    w.scalars(2 if start else 1, {"train/loss": 1.0})
    w.close()
  run_id = open(os.path.join(wd, logs.WANDB_ID_FILE)).read().strip()
  runs = sorted(glob.glob(os.path.join(wd, "wandb", "offline-run-*")))
  assert len(runs) == 2 and all(r.endswith(f"-{run_id}") for r in runs), runs
  assert all(os.path.getsize(os.path.join(r, f"run-{run_id}.wandb")) > 0 for r in runs)
