"""Entry point of ``python -m colar_jax.data`` (see :mod:`colar_jax.data.cli`)."""

import sys

from colar_jax.data.cli import main

sys.exit(main())
