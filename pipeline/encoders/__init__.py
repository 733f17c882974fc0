"""Encoders: images (:mod:`.image`), texts (:mod:`.text`), what they share (:mod:`.common`); on ONNX
Runtime, the image encoders (:mod:`.image_onnx`) and the MiniLM text model (:mod:`.text_onnx`), exported
once, cached and checked against PyTorch by :mod:`.onnx_cache`."""
