"""Baselines: stored runs (:mod:`.store`), the statistics comparing a run with them
(:mod:`.compare`), and the regression gate of one test (:mod:`.gate`)."""
