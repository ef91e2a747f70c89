"""``python -m colar_jax COMMAND``: see :mod:`colar_jax.cli`."""

from colar_jax.cli import main

if __name__ == "__main__":
  main()
