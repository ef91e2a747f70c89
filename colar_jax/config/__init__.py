"""The run config schema: one set of frozen dataclasses, rooted at :class:`Run`.

The dataclasses below are the only place where defaults and their meanings live;
every field carries a one-line help text (``metadata["help"]``) that
``python -m colar_jax config show`` prints. Everything else is derived:

* :func:`base_config` / :func:`to_config_dict` turn a ``Run`` into an
  ``ml_collections.ConfigDict`` (sections become nested ConfigDicts, tuples stay
  tuples, ``None`` optional fields become typed placeholders), which config
  files edit and absl-style flags override.
* :func:`from_config_dict` goes back to a typed, validated ``Run``; unknown keys
  fail with the nearest known key, wrong types with the expected type.
* :func:`apply_overrides` parses ``"a.b.c=value"`` by the type of the field in
  the schema (bool, int, float, str, ``str | None``, tuples as Python
  literals), so ``colar.factors=1,2,5`` yields ``(1, 2, 5)``; a misspelt key
  fails with "did you mean ...". The result is validated as a whole, since
  some checks span keys (one factor weight per factor).
* :func:`load` runs ``get_config([ARG])`` of a ``file.py[:ARG]`` config file.
* :func:`load_json` reads a saved run config; configs saved by older versions
  are first rewritten to the current keys by :func:`upgrade_legacy` (comma
  strings become tuples, moved keys move), then missing keys take defaults.

Lowest layer of the package: only the standard library and ml_collections.
"""

from colar_jax.config.derive import (
  apply_overrides,
  apply_preset,
  base_config,
  describe,
  flatten,
  format_show,
  from_config_dict,
  load,
  load_json,
  load_module,
  save_json,
  to_config_dict,
  to_dict,
  upgrade_legacy,
  validate,
)
from colar_jax.config.schema import (
  MODEL_PRESETS,
  RL,
  Arch,
  Baselines,
  Coconut,
  Colar,
  ConfigError,
  Curriculum,
  Data,
  Distill,
  Distributed,
  Mesh,
  Model,
  Optim,
  Rollout,
  Run,
  Sharding,
  Synthetic,
  Train,
  field,
)

__all__ = [
  "MODEL_PRESETS",
  "RL",
  "Arch",
  "Baselines",
  "Coconut",
  "Colar",
  "ConfigError",
  "Curriculum",
  "Data",
  "Distill",
  "Distributed",
  "Mesh",
  "Model",
  "Optim",
  "Rollout",
  "Run",
  "Sharding",
  "Synthetic",
  "Train",
  "apply_overrides",
  "apply_preset",
  "base_config",
  "describe",
  "field",
  "flatten",
  "format_show",
  "from_config_dict",
  "load",
  "load_json",
  "load_module",
  "save_json",
  "to_config_dict",
  "to_dict",
  "upgrade_legacy",
  "validate",
]
