"""`zsl embed-text`, `zsl export` (clip-retrieval's layout) and `zsl import`: caption embeddings that
line up with the feature rows, exports that equal the features (or the model's search vectors)
row for row, and imports that give the same features back."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.core import fs as zio
from pipeline.core.config import EmbedTextConfig, ExportConfig, ImportConfig
from pipeline.core.features import CAPTIONS_DIR, load_features, write_features
from pipeline.core.vectors import l2n

CAPS = ["a striped horse", None, "a grey elephant", "", "a small bird", "a cat on a mat", "a dog", None, "a zebra",
        "a giraffe eating leaves", "an owl at night", "a fish"]


@pytest.fixture()
def captioned(tmp_path):
    rng = np.random.default_rng(0)
    X = rng.standard_normal((12, 16)).astype(np.float32)
    write_features(str(tmp_path / "feats"), image_ids=[f"i{k:02d}" for k in range(12)],
                   uris=[f"/img/{k}.jpg" for k in range(12)], labels=["a", "b", "c"] * 4, X=X,
                   model_id="fake-feat", shard_size=5, captions=CAPS)
    return tmp_path / "feats", X


def test_embed_text_lines_up_with_the_rows_and_resumes(captioned, monkeypatch):
    from pipeline.encoders.text import load_text_encoder
    from pipeline.stages.embed_text import run_embed_text

    feats, _ = captioned
    m = run_embed_text(EmbedTextConfig(features=str(feats)), progress=False)
    assert (m.n_rows, m.n_captions, m.n_shards, m.dim, m.text_model) == (12, 9, 3, 384, "minilm")
    t = pq.ParquetDataset(str(feats / CAPTIONS_DIR / "shards")).read()
    assert t.column("image_id").to_pylist() == [f"i{k:02d}" for k in range(12)]
    has = t.column("has_caption").to_pylist()
    assert has == [bool(c) for c in CAPS]
    E = np.asarray(t.column("embedding").to_pylist(), np.float32)
    enc = load_text_encoder("minilm")
    want = enc.encode(["a grey elephant", "a dog"])
    np.testing.assert_allclose(E[[2, 6]], want, atol=1e-5)
    assert not E[[1, 3, 7]].any()
    # a rerun embeds nothing; a new text model is refused unless --overwrite
    import pipeline.stages.embed_text as stage

    monkeypatch.setattr(stage, "load_text_encoder", lambda *a, **k: pytest.fail("re-embedded a finished shard"))
    assert run_embed_text(EmbedTextConfig(features=str(feats)), progress=False).n_captions == 9
    with pytest.raises(ValueError, match="other inputs or settings"):
        run_embed_text(EmbedTextConfig(features=str(feats), column="label"), progress=False)


def test_embed_text_names_a_missing_column(captioned):
    from pipeline.stages.embed_text import run_embed_text

    with pytest.raises(ValueError, match="no column 'text'"):
        run_embed_text(EmbedTextConfig(features=str(captioned[0]), column="text"), progress=False)


def test_export_is_the_features_row_for_row_and_import_gives_them_back(captioned, tmp_path):
    from pipeline.stages.embed_text import run_embed_text
    from pipeline.stages.interop import run_export, run_import

    feats, X = captioned
    run_embed_text(EmbedTextConfig(features=str(feats)), progress=False)
    out = tmp_path / "export"
    m = run_export(ExportConfig(features=str(feats), output=str(out)), progress=False)
    assert (m.n_rows, m.dim, m.dtype, m.space, m.text_dim) == (12, 16, "float16", "features", 384)
    parts = [np.load(out / "img_emb" / f"img_emb_{i:06d}.npy") for i in range(3)]
    assert [p.shape for p in parts] == [(5, 16), (5, 16), (2, 16)] and parts[0].dtype == np.float16
    np.testing.assert_allclose(np.concatenate(parts), l2n(X), atol=2e-3)
    meta = [pq.read_table(out / "metadata" / f"metadata_{i:06d}.parquet") for i in range(3)]
    assert sum((t.column("image_id").to_pylist() for t in meta), []) == [f"i{k:02d}" for k in range(12)]
    assert meta[0].column("image_path").to_pylist()[0] == "/img/0.jpg"
    assert meta[0].column("caption").to_pylist()[:2] == ["a striped horse", None]
    assert np.load(out / "text_emb" / "text_emb_000001.npy").shape == (5, 384)

    back = tmp_path / "imported"
    fm = run_import(ImportConfig(input=str(out), output=str(back), model_id="fake-feat", text_model="minilm"),
                    progress=False)
    assert (fm.n_images, fm.dim, fm.n_shards, fm.model_id) == (12, 16, 3, "fake-feat")
    f = load_features(str(back))
    np.testing.assert_allclose(f.X, l2n(X), atol=2e-3)
    assert list(f.image_ids) == [f"i{k:02d}" for k in range(12)] and list(f.labels) == ["a", "b", "c"] * 4
    cm = zio.read_json(str(back / CAPTIONS_DIR / "manifest.json"))
    assert cm["n_captions"] == 9 and cm["dim"] == 384


def test_export_of_model_vectors_is_the_index_space(serve_world, tmp_path):
    from pipeline.stages.interop import run_export

    s, root, _, _ = serve_world
    m = run_export(ExportConfig(features=str(root / "features"), output=str(tmp_path / "e"), dtype="float32",
                                model=s.index_dir + "/model"), progress=False)
    assert m.space == "model" and m.dim == s.dim == 8
    V = np.concatenate([np.load(tmp_path / "e" / "img_emb" / f"img_emb_{i:06d}.npy") for i in range(3)])
    X = load_features(str(root / "features")).X
    np.testing.assert_allclose(V, s.model.search_images(X), atol=1e-5)
    # the index holds these very vectors: each is its own nearest neighbour
    ids = [h[0]["faiss_id"] for h in s.search_vectors(V[:20], 1)]
    assert ids == list(range(20))


def test_import_refuses_mismatched_parts(tmp_path):
    from pipeline.stages.interop import run_import

    (tmp_path / "img_emb").mkdir()
    (tmp_path / "metadata").mkdir()
    np.save(tmp_path / "img_emb" / "img_emb_0.npy", np.zeros((3, 4), np.float16))
    import pyarrow as pa

    pq.write_table(pa.table({"image_path": ["a", "b"]}), tmp_path / "metadata" / "metadata_0.parquet")
    with pytest.raises(ValueError, match=r"shape \(3, 4\), expected \(2, 4\)"):
        run_import(ImportConfig(input=str(tmp_path), output=str(tmp_path / "o"), model_id="x"), progress=False)
    np.save(tmp_path / "img_emb" / "img_emb_1.npy", np.zeros((3, 4), np.float16))
    with pytest.raises(ValueError, match="img_emb_1.npy has no metadata"):
        run_import(ImportConfig(input=str(tmp_path), output=str(tmp_path / "o2"), model_id="x"), progress=False)


def test_caption_embeddings_of_other_rows_are_refused_everywhere(captioned, tmp_path):
    """Export, the bridge's pairs and the caption index read caption shards through one check."""
    import pyarrow as pa

    from pipeline.core.features import caption_shards, read_caption_shard
    from pipeline.stages.bridge import load_pairs
    from pipeline.stages.embed_text import run_embed_text
    from pipeline.stages.interop import run_export

    feats, _ = captioned
    run_embed_text(EmbedTextConfig(features=str(feats)), progress=False)
    caps = caption_shards(str(feats))
    first = sorted(caps)[0]
    t = pq.read_table(caps[first])
    ids = t.column("image_id").to_pylist()
    pq.write_table(t.set_column(0, "image_id", pa.array(ids[::-1], pa.string())), caps[first])  # same rows, reordered
    with pytest.raises(ValueError, match="do not match .* row by row"):
        run_export(ExportConfig(features=str(feats), output=str(tmp_path / "e")), progress=False)
    with pytest.raises(ValueError, match="do not match .* row by row"):
        load_pairs(str(feats))
    with pytest.raises(ValueError, match="has no caption embeddings"):
        read_caption_shard(str(feats), {}, caps[first], ids, 384)
