"""The stages, side by side: each turns its inputs into one output and imports only lower layers.

In the order an image travels: ``extract`` (image shards -> feature directory), ``classes``
(class table -> class set), ``train`` (features + class set -> model), ``evaluate`` (model + test
features -> metrics), ``label`` (model + class set + features -> labels; also add-classes),
``index`` (model + features -> FAISS index), ``search`` (index + text -> hits), ``serve`` (indexes ->
an HTTP service and its page; a package), ``report`` (metrics + hits -> HTML); beside them
``embed_text`` (captions -> caption embeddings), ``bridge`` (captioned images -> a caption bridge
model) and ``interop`` (clip-retrieval export, import). ``zsl corpus`` and ``zsl demo-data`` write
inputs and run from :mod:`pipeline.inputs`. No stage imports another (``tests/test_layers.py`` fails
if one does).
"""
