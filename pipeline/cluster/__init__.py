"""All Ray code: the session (:mod:`.session`), the extraction dataflow (:mod:`.extraction`), per-shard
jobs on an actor pool (:mod:`.shard_jobs`) and the Ray Serve deployment (:mod:`.ray_serve`)."""
