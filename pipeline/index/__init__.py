"""FAISS indexes: choosing a factory under a memory budget (:mod:`.choose`, no faiss import), the plan of
a run (:mod:`.plan`, no faiss import), building/training/merging (:mod:`.build`, :mod:`.partitions`),
the projection cache (:mod:`.projection`), store/load/ids (:mod:`.store`), search, exact k-NN and recall
(:mod:`.knn`), tuning (:mod:`.tune`), label filters that keep recall (:mod:`.filters`, its ways in :mod:`.filter_paths`), the caption index (:mod:`.captions`), and the searcher that
``zsl search`` and the service query (:mod:`.searcher`)."""
