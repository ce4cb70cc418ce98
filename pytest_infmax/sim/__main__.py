"""``python -m pytest_infmax.sim``: run the simulator (see :func:`pytest_infmax.sim.main`)."""

from pytest_infmax.sim import main

raise SystemExit(main())
