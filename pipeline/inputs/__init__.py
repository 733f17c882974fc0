"""Image inputs: one module per layout (:mod:`.folder`, :mod:`.img2dataset`, :mod:`.webdataset`,
:mod:`.parquet`) behind :mod:`.registry`, with :mod:`.base`'s ``Shard``/``Record``/``Layout``; image
decoding (:mod:`.images`); the Open Clip Art caption corpus (:mod:`.corpus`); the demo data (:mod:`.demo_data`)."""
