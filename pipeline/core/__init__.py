"""The base layer: fs and atomic writes (:mod:`.fs`), Parquet helpers (:mod:`.parquet`), typed config
(:mod:`.config`, :mod:`.serve_config`, on :mod:`.config_base`) and human units (:mod:`.units`), table schemas (:mod:`.schema`) and typed manifests
(:mod:`.manifests`), the one resume protocol (:mod:`.resume`), feature shards on disk (:mod:`.features`),
timing (:mod:`.timing`), vector helpers (:mod:`.vectors`: l2n, tie-aware top-k). Imports nothing
else of the project."""
