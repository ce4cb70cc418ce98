"""From records to figures and verdicts: the metric registry (:mod:`.registry`), the SLA
grammar (:mod:`.sla`), the computation (:mod:`.metrics`), judging (:mod:`.verdicts`),
and cost, energy, the server's own metrics and the Pareto frontier."""
