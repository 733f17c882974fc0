"""Encoders: images (:mod:`.image`), texts (:mod:`.text`), what they share (:mod:`.common`), and the
MiniLM text model on ONNX Runtime (:mod:`.text_onnx`)."""
