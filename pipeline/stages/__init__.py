"""The stages, side by side: each turns its inputs into one output and imports only lower layers.

In the order an image travels: ``extract`` (image shards -> feature directory), ``classes``
(class table -> class set), ``train`` (features + class set -> model), ``evaluate`` (model + test
features -> metrics), ``label`` (model + class set + features -> labels; also add-classes),
``index`` (model + features -> FAISS index), ``search`` (index + text -> hits), ``report``
(metrics + hits -> HTML). No stage imports another (``tests/test_layers.py`` fails if one does).
"""
