"""One measured load end to end (:mod:`.runner`'s ``Infmax``), its result (:mod:`.results`),
sweeps over concurrency (:mod:`.sweep`) and repeated runs (:mod:`.repeats`)."""
