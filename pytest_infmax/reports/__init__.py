"""Reports from plain result dicts: the terminal table (:mod:`.table`), the JSON results
file (:mod:`.document`), Markdown (:mod:`.markdown`), HTML (:mod:`.html`) and plots (:mod:`.plots`)."""
