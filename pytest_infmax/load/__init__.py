"""The load: what to send (:mod:`.scenarios`), the run's plan and records (:mod:`.plan`),
sending it and timing every token (:mod:`.generator`, :mod:`.streamclient`, the C
extension ``_lane``), over several processes (:mod:`.workers`, :mod:`.worker_main`), and
the client watching itself (:mod:`.clientstats`, :mod:`.progress`)."""
