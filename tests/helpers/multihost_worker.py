"""Worker for tests/test_multihost.py: a few sharded train steps of the tiny model.

Run as N processes (each with --xla_force_host_platform_device_count=8/N) joined
by jax.distributed on localhost, or as one 8-device process; prints the losses
as JSON so the test can compare them.
"""

import json
import sys

import jax

jax.config.update("jax_cpu_collectives_implementation", "gloo")

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from colar_jax import config  # noqa: E402
from colar_jax.model import CoLaRModel, ModelConfig  # noqa: E402
from colar_jax.model import sharding as sh  # noqa: E402


def main() -> None:
  nproc, pid, port = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
  # The typed config sections a run hands to the sharding layer (run.distributed,
  # run.mesh), built through the schema so they are validated like a real run's.
  run = config.from_config_dict(
    {
      "mesh": {"data": 2, "fsdp": 2, "tensor": 2},
      "distributed": {
        "initialize": "true" if nproc > 1 else "false",
        "coordinator_address": f"localhost:{port}" if nproc > 1 else "",
        "num_processes": nproc,
        "process_id": pid,
      },
    }
  )
  sh.maybe_initialize_distributed(run.distributed)
  assert jax.process_count() == nproc, (jax.process_count(), nproc)
  mesh = sh.make_mesh(run.mesh)
  sh.check_process_layout(mesh)
  rules = sh.DEFAULT_RULES
  mc = ModelConfig(
    vocab_size=48,
    hidden_size=64,
    intermediate_size=128,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
  )
  model = sh.create_sharded(lambda: CoLaRModel(mc, rngs=nnx.Rngs(0)), mesh, rules)
  graphdef, state = nnx.split(model)
  tx = optax.adamw(3e-3)
  opt = jax.jit(tx.init)(state)

  def loss_fn(st, ids):
    out = nnx.merge(graphdef, st).lm(ids)
    logp = jax.nn.log_softmax(out.logits[:, :-1])
    return -jnp.take_along_axis(logp, ids[:, 1:, None], -1).mean()

  @jax.jit
  def step(st, opt, ids):
    loss, g = jax.value_and_grad(loss_fn)(st, ids)
    upd, opt = tx.update(g, opt, st)
    return optax.apply_updates(st, upd), opt, loss

  global_batch = np.random.default_rng(0).integers(1, 48, size=(4, 8, 12)).astype(np.int32)
  bs = sh.batch_sharding(mesh, rules)
  losses = []
  for ids in global_batch:
    # Each process supplies only its own rows, as a real multi-host input pipeline does.
    n = jax.process_count()
    local = np.split(ids, n)[jax.process_index()]
    arr = jax.make_array_from_process_local_data(bs, local, ids.shape)
    state, opt, loss = step(state, opt, arr)
    losses.append(float(loss))
  if jax.process_index() == 0:
    print("LOSSES " + json.dumps(losses), flush=True)


def sft_main() -> None:
  """``sft NPROC PID PORT WORKDIR DATA_DIR``: the real trainer (``python -m colar_jax
  sft``, checkpoints in the shared WORKDIR) as process PID of NPROC; the env's
  ``COLAR_DEBUG_KILL_AT_STEP`` SIGKILLs it mid-run."""
  from helpers import tiny_run  # noqa: PLC0415 (tests/ is on the path only here)

  from colar_jax import cli  # noqa: PLC0415 (after the collectives are set)

  nproc, pid, port, workdir, data_dir = sys.argv[2:7]
  dist = (
    [
      "--config.distributed.initialize=true",
      f"--config.distributed.coordinator_address=localhost:{port}",
      f"--config.distributed.num_processes={nproc}",
      f"--config.distributed.process_id={pid}",
    ]
    if int(nproc) > 1
    else ["--config.distributed.initialize=false"]
  )
  flags = tiny_run.overrides(
    data_dir, **{"train.num_steps": 6, "train.keep_last": 3, "train.log_every": 1}
  )
  cli.main(["sft", f"--config={tiny_run.CONFIG}", f"--workdir={workdir}", *flags, *dist])
  print(f"DONE process {jax.process_index()}", flush=True)


if __name__ == "__main__":
  if sys.argv[1] == "sft":
    sys.path.insert(0, __file__.rsplit("/", 2)[0])
    sft_main()
  else:
    main()
