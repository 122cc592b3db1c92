"""Reading a BIDS dataset: input checks (:mod:`.validation`), ``--bids-filter-file``
(:mod:`.filters`), EEG-BOLD run pairs (:mod:`.pairing`), sidecar metadata (:mod:`.metadata`),
TSV sidecars as public datasets write them (:mod:`.tsv`) and git-annex pointers (:mod:`.annex`).

BIDS *names* (entities, parsing, building) are :mod:`spec2vol_bids.naming`'s.
"""
