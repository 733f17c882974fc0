"""Class semantics: class tables and prompts (:mod:`.class_table`), class sets on disk with their text,
attribute and word-vector semantics (:mod:`.classset`), GloVe word vectors (:mod:`.wordvectors`)."""
