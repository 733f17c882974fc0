"""Exactly-once, resumable jobs and atomic outputs, in-process and fast.

``zsl extract`` runs here with Ray replaced by an in-process stand-in (the real ``decode_shard``, a
deterministic fake encoder) so that crashes can be injected at exact points; the real thing, killed
with SIGKILL, is tests/jobs/test_resume.py. ``zsl label`` and ``zsl index`` run for real.
"""

from __future__ import annotations

import os
import threading

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from pipeline.core import fs as zio
from pipeline.core import parquet as zpq
from pipeline.core.config import ConfigError, ExtractConfig, IndexConfig, LabelConfig
from pipeline.core.features import load_features, shard_name
from pipeline.stages.extract import run_extract

# ---------------------------------------------------------------- extract, without Ray


class Killed(Exception):
    """Stands for the process dying at this point."""


def _die_after_writes(monkeypatch, name: str, n: int):
    """Patch ``pipeline.core.fs.<name>`` (or ``pipeline.core.parquet.<name>``) to complete ``n`` writes (or
    hand out ``n`` writers), then raise Killed; return the real writer."""
    module = zpq if hasattr(zpq, name) else zio
    real, calls = getattr(module, name), []

    def dying(uri, data):
        if len(calls) == n:
            raise Killed
        calls.append(uri)
        return real(uri, data)

    monkeypatch.setattr(module, name, dying)
    return real


@pytest.fixture
def fake_ray(monkeypatch):
    """Replace the Ray dataflow by the same mappers run in-process; ``state`` steers crashes."""
    import pipeline.cluster.extraction as rs

    state = {"batches": 0, "crash_after_batches": None, "shards_run": []}

    def run_extraction(shards, *, image_size, max_pixels, read, on_rows, **kw):
        state["kwargs"] = kw
        outs = []
        for s in shards:
            state["shards_run"].append(s.shard_id)
            # streamed in blocks of 4 as on Ray: rows before a shard's last block carry shard_n = -1
            blocks = list(rs.decode_chunks({"shard": np.array([s.to_json()], dtype=object)}, image_size=image_size,
                                           max_pixels=max_pixels, read=read, chunk_rows=4))
            if not blocks:  # a shard with no items delivers nothing
                continue
            out = {k: np.concatenate([b[k] for b in blocks]) for k in blocks[0]}
            px = out.pop("pixels")
            emb = np.zeros((len(px), 1280), np.float32)
            emb[:, :48] = px[:, 100:104, 100:104, :].reshape(len(px), 48) / 255.0
            out["embedding"] = emb
            outs.append(out)
        # deliver each shard in two halves, interleaved with the next shard's (as Ray's batches may be)
        first = [{k: v[: len(o["shard_id"]) // 2] for k, v in o.items()} for o in outs]
        second = [{k: v[len(o["shard_id"]) // 2 :] for k, v in o.items()} for o in outs]
        order = []
        for i in range(len(outs)):
            order += [first[i]] + ([second[i - 1]] if i else [])
        order += second[-1:]
        for batch in order:
            if state["crash_after_batches"] is not None and state["batches"] >= state["crash_after_batches"]:
                raise Killed
            on_rows(batch)
            state["batches"] += 1
        return rs.ResourcePlan(1, 1.0, 0.0, 1, "cpu")

    monkeypatch.setattr(rs, "run_extraction", run_extraction)
    import pipeline.cluster.session as session

    monkeypatch.setattr(session, "init_ray", lambda *a, **k: None)
    return state


@pytest.fixture
def image_folder(tmp_path, animal_mnist):
    """30 real animal-mnist PNGs in 3 class folders, plus one empty file (an error row)."""
    x, y = animal_mnist
    root = tmp_path / "in"
    for c, name in enumerate(("bear", "bird", "cat")):
        (root / name).mkdir(parents=True)
        for i in np.flatnonzero(y == c)[:10]:
            Image.fromarray(x[i]).save(root / name / f"{int(i):05d}.png")
    (root / "cat" / "99999-empty.png").write_bytes(b"")
    return root


def _cfg(inp, out, **kw) -> ExtractConfig:
    return ExtractConfig(input=str(inp), output=str(out), shard_size=4, **kw)


def _snapshot(out) -> dict:
    feats = zpq.read_parquet_dir(str(out / "features"))
    errs = zpq.read_parquet_dir(str(out / "errors"))
    emb = np.stack(feats.column("embedding").to_numpy(zero_copy_only=False))
    return {"ids": feats.column("image_id").to_pylist(), "emb": emb, "errors": errs.to_pylist()}


def test_extract_crash_mid_run_then_rerun_equals_uninterrupted(fake_ray, image_folder, tmp_path):
    ref = run_extract(_cfg(image_folder, tmp_path / "ref"), progress=False)
    want = _snapshot(tmp_path / "ref")
    assert (ref.n_shards, ref.n_images, ref.n_errors) == (8, 30, 1)

    out = tmp_path / "out"
    fake_ray.update(batches=0, crash_after_batches=7, shards_run=[])
    with pytest.raises(Killed):
        run_extract(_cfg(image_folder, out), progress=False)
    done_before = {p.name: p.stat().st_mtime_ns for p in (out / "features").iterdir()}
    assert 0 < len(done_before) < 8
    assert not (out / "manifest.json").exists()  # an interrupted output never looks finished
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        load_features(str(out))

    fake_ray.update(batches=0, crash_after_batches=None, shards_run=[])
    m = run_extract(_cfg(image_folder, out), progress=False)
    assert sorted(fake_ray["shards_run"]) == sorted(set(range(8)) - {int(n[6:12]) for n in done_before})
    assert {n: (out / "features" / n).stat().st_mtime_ns for n in done_before} == done_before  # untouched
    got = _snapshot(out)
    assert got["ids"] == want["ids"] and len(set(got["ids"])) == 30
    np.testing.assert_array_equal(got["emb"], want["emb"])
    assert got["errors"] == want["errors"] and len(got["errors"]) == 1
    assert (m.n_images, m.n_errors, m.n_shards) == (30, 1, 8)


def test_extract_killed_between_errors_and_features_file(fake_ray, image_folder, tmp_path, monkeypatch):
    """The errors file is written first; a kill before the features file means the shard is redone and
    its errors file replaced, never appended to."""
    out = tmp_path / "out"
    real = zpq.write_parquet_atomic
    target = f"features/{shard_name(7)}"  # shard 7 holds the empty file: it has an error row

    def dying_write(uri, table):
        if uri.endswith(target):
            raise Killed
        real(uri, table)

    monkeypatch.setattr(zpq, "write_parquet_atomic", dying_write)
    with pytest.raises(Killed):
        run_extract(_cfg(image_folder, out), progress=False)
    monkeypatch.setattr(zpq, "write_parquet_atomic", real)
    assert (out / "errors" / shard_name(7)).exists() and not (out / "features" / shard_name(7)).exists()
    fake_ray.update(shards_run=[])
    m = run_extract(_cfg(image_folder, out), progress=False)
    assert 7 in fake_ray["shards_run"]
    errs = zpq.read_parquet_dir(str(out / "errors")).to_pylist()
    assert [e["image_id"] for e in errs] == ["cat/99999-empty.png"]  # once, not twice
    assert m.n_errors == 1 and m.n_images == 30


def test_an_empty_tar_is_a_done_shard_not_pending_forever(fake_ray, image_folder, tmp_path):
    import io
    import tarfile

    tars = tmp_path / "tars"
    tars.mkdir()
    pngs = sorted(image_folder.rglob("*.png"))[:3]
    with tarfile.open(tars / "00000.tar", "w") as tf:
        for i, p in enumerate(pngs):
            info = tarfile.TarInfo(f"{i:09d}.png")
            info.size = p.stat().st_size
            tf.addfile(info, io.BytesIO(p.read_bytes()))
    tarfile.open(tars / "00001.tar", "w").close()  # img2dataset can leave one when every download failed
    out = tmp_path / "out"
    m = run_extract(ExtractConfig(input=str(tars), output=str(out)), progress=False)
    assert (m.n_shards, m.n_images, m.n_errors) == (2, 3, 0)
    assert sorted(os.listdir(out / "features")) == [shard_name(0), shard_name(1)]
    fake_ray["shards_run"].clear()
    run_extract(ExtractConfig(input=str(tars), output=str(out)), progress=False)
    assert fake_ray["shards_run"] == []  # nothing pending on a rerun


def test_writer_ignores_repeated_rows(fake_ray, image_folder, tmp_path, monkeypatch):
    """A retried task may deliver rows twice: they replace themselves, and rows of a written shard are dropped."""
    from pipeline.stages import extract

    seen: list[int] = []
    real_call = extract._ShardWriter.__call__

    def twice(self, batch):
        real_call(self, batch)
        real_call(self, batch)
        seen.append(len(batch["shard_id"]))

    monkeypatch.setattr(extract._ShardWriter, "__call__", twice)
    m = run_extract(_cfg(image_folder, tmp_path / "out"), progress=False)
    ids = zpq.read_parquet_dir(str(tmp_path / "out" / "features")).column("image_id").to_pylist()
    assert len(ids) == len(set(ids)) == 30 and m.n_images == 30 and m.n_errors == 1


def test_temp_files_left_by_a_kill_are_invisible_and_cleaned(fake_ray, image_folder, tmp_path):
    out = tmp_path / "out"
    run_extract(_cfg(image_folder, out), progress=False)
    for d in ("features", "errors"):  # what a SIGKILL during a write leaves: a complete-looking temp file
        (out / d / f"{zio.TMP_PREFIX}deadbeef-{shard_name(3)}").write_bytes((out / d / shard_name(3)).read_bytes())
    (out / f"{zio.TMP_PREFIX}cafe0000-manifest.json").write_text("{")
    assert all(zio.TMP_PREFIX not in f for f in zio.list_files(str(out)))
    assert zpq.read_parquet_dir(str(out / "features")).num_rows == 30  # not 34
    fake_ray.update(shards_run=[])
    m = run_extract(_cfg(image_folder, out), progress=False)
    assert fake_ray["shards_run"] == [] and m.n_images == 30
    assert not [f for _, _, fs in os.walk(out) for f in fs if f.startswith(zio.TMP_PREFIX)]


def test_all_done_but_no_manifest_finishes_without_work(fake_ray, image_folder, tmp_path):
    out = tmp_path / "out"
    first = run_extract(_cfg(image_folder, out), progress=False)
    os.remove(out / "manifest.json")  # killed after the last shard, before the manifest
    fake_ray.update(shards_run=[])
    again = run_extract(_cfg(image_folder, out), progress=False)
    assert fake_ray["shards_run"] == []
    assert {k: getattr(again, k) for k in ("n_images", "n_errors", "n_shards")} == \
        {k: getattr(first, k) for k in ("n_images", "n_errors", "n_shards")}


def test_limit_then_full_run_extends_the_output(fake_ray, image_folder, tmp_path):
    out = tmp_path / "out"
    assert run_extract(_cfg(image_folder, out, limit=3), progress=False).n_images == 12
    fake_ray.update(shards_run=[])
    m = run_extract(_cfg(image_folder, out), progress=False)
    assert sorted(fake_ray["shards_run"]) == [3, 4, 5, 6, 7] and m.n_images == 30


def test_rerun_with_another_encoder_or_shard_size_is_refused(fake_ray, image_folder, tmp_path):
    out = tmp_path / "out"
    run_extract(_cfg(image_folder, out, limit=2), progress=False)
    before = sorted(p.name for p in out.rglob("*"))
    with pytest.raises(ConfigError, match=r"other inputs or settings \(encoder: was 'effnet-lite0', now 'open_clip:ViT-S-32'"):
        run_extract(_cfg(image_folder, out, encoder="open_clip:ViT-S-32", pretrained="random"), progress=False)
    with pytest.raises(ConfigError, match="shard_size: was 4, now 5"):
        run_extract(ExtractConfig(input=str(image_folder), output=str(out), shard_size=5), progress=False)
    assert sorted(p.name for p in out.rglob("*")) == before


def test_jpeg_draft_is_identity_when_on_and_outputs_keep_their_decoding(fake_ray, image_folder, tmp_path):
    from pipeline.core.features import features_identity, open_features

    new = tmp_path / "new"  # a new output decodes large JPEGs in draft mode, and says so in its identity
    m = run_extract(_cfg(image_folder, new, limit=2), progress=False)
    assert fake_ray["kwargs"]["draft"] is True and m.config["jpeg_draft"] is True
    assert zio.read_json(str(new / "run.json"))["identity"]["jpeg_draft"] is True
    old = tmp_path / "old"  # as extracted before the setting existed: no jpeg_draft in its identity
    run_extract(_cfg(image_folder, old, limit=2, jpeg_draft=False), progress=False)
    assert "jpeg_draft" not in zio.read_json(str(old / "run.json"))["identity"]
    fid = features_identity(str(old), open_features(str(old)))
    m = run_extract(_cfg(image_folder, old), progress=False)  # the default resumes it, decoding as before
    assert fake_ray["kwargs"]["draft"] is False and m.n_images == 30 and m.config["jpeg_draft"] is False
    assert features_identity(str(old), open_features(str(old))) == fid  # labels/indexes made from it stay valid
    with pytest.raises(ConfigError, match="jpeg_draft"):  # mixing two decodings in one output is refused
        run_extract(_cfg(image_folder, old, jpeg_draft=True), progress=False)
    # how the encoder runs is not identity: an output resumes on either backend
    m = run_extract(_cfg(image_folder, new, image_backend="torch"), progress=False)
    assert fake_ray["kwargs"]["backend"] == "torch" and m.n_images == 30 and m.config["jpeg_draft"] is True


def _files(out) -> dict:
    return {p.relative_to(out).as_posix(): (p.stat().st_mtime_ns, p.read_bytes()) for p in out.rglob("*")
            if p.is_file() and not p.name.endswith(".lock")}


def test_new_files_become_new_shards_whatever_they_sort_as(fake_ray, image_folder, tmp_path):
    """Growth: a file sorting into finished shards, a new class folder sorting first, more inputs: new shards
    after the recorded ones; recorded shards never change; a run with nothing new writes nothing."""
    out = tmp_path / "out"
    run_extract(_cfg(image_folder, out, limit=3), progress=False)  # shards 0-2 of 0-7 done
    done = {k: v for k, v in _files(out).items() if k.startswith("features/")}
    Image.new("L", (28, 28)).save(image_folder / "bear" / "00000-new.png")  # sorts into shard 0
    (image_folder / "ant").mkdir()
    for i in range(5):  # a new class folder, sorting before every other
        Image.new("L", (28, 28), color=i * 40).save(image_folder / "ant" / f"{i}.png")
    fake_ray.update(shards_run=[])
    m = run_extract(_cfg(image_folder, out), progress=False)
    assert sorted(fake_ray["shards_run"]) == [3, 4, 5, 6, 7, 8, 9]  # the rest of the plan, then 2 new shards
    assert {k: v for k, v in _files(out).items() if k in done} == done  # finished shards untouched
    assert m.n_images == 36 and m.n_shards == 10
    new_ids = zpq.read_parquet_dir(str(out / "features")).column("image_id").to_pylist()
    assert len(new_ids) == len(set(new_ids)) == 36
    eight = zpq.read_parquet(str(out / "features" / "shard-000008.parquet")).column("image_id").to_pylist()
    assert eight == ["ant/0.png", "ant/1.png", "ant/2.png", "ant/3.png"]  # listing order among the new ones
    # nothing new: nothing run, no file rewritten
    before = _files(out)
    fake_ray.update(shards_run=[])
    run_extract(_cfg(image_folder, out), progress=False)
    assert fake_ray["shards_run"] == [] and _files(out) == before
    # a second input added later is growth too (the first input names the features)
    extra = tmp_path / "more" / "dog"
    extra.mkdir(parents=True)
    Image.new("L", (28, 28)).save(extra / "1.png")
    m = run_extract(_cfg(image_folder, out).model_copy(update={"input": (str(image_folder), str(tmp_path / "more"))}),
                    progress=False)
    assert fake_ray["shards_run"] == [10] and m.n_images == 37


def test_vanished_and_changed_files_are_reported_not_reextracted(fake_ray, image_folder, tmp_path):
    out = tmp_path / "out"
    run_extract(_cfg(image_folder, out), progress=False)
    victims = sorted((image_folder / "bird").iterdir())
    victims[0].unlink()
    victims[1].write_bytes(victims[1].read_bytes() + b"\0" * 10)  # same name, other content
    fake_ray.update(shards_run=[])
    m = run_extract(_cfg(image_folder, out), progress=False)
    assert fake_ray["shards_run"] == [] and (m.n_vanished, m.n_changed) == (1, 1)
    t = zpq.read_parquet(str(out / "input_changes.parquet"))
    assert dict(zip(t.column("item").to_pylist(), t.column("what").to_pylist())) == {
        str(victims[0]): "vanished", str(victims[1]): "changed"}
    assert m.n_images == 30  # their rows stay as extracted


def test_an_output_of_an_earlier_version_keeps_its_shards_or_is_refused(fake_ray, image_folder, tmp_path):
    """Outputs extracted before plans were recorded: the listing is adopted when their shards still hold what
    they held; a file sorted into them cannot be told from a rename, so that is refused as before."""
    out = tmp_path / "out"
    run_extract(_cfg(image_folder, out, limit=3), progress=False)
    (out / "plan.parquet").unlink()  # as an earlier version left it (run.json holds the shards' fingerprints)
    import json
    from pipeline.stages.extract import _list_input, shard_plan
    rec = json.loads((out / "run.json").read_text())
    rec["state"] = {"shards": shard_plan(_list_input(_cfg(image_folder, out)))}
    (out / "run.json").write_text(json.dumps(rec))
    Image.new("L", (28, 28)).save(image_folder / "bear" / "00000-new.png")
    with pytest.raises(ConfigError, match=r"changed since .* was extracted \(shard\(s\) 0, 1, 2 now hold other items"):
        run_extract(_cfg(image_folder, out), progress=False)
    os.remove(image_folder / "bear" / "00000-new.png")
    fake_ray.update(shards_run=[])
    m = run_extract(_cfg(image_folder, out), progress=False)
    assert sorted(fake_ray["shards_run"]) == [3, 4, 5, 6, 7] and m.n_images == 30 and (out / "plan.parquet").exists()


def test_second_job_on_the_same_output_is_refused(tmp_path, image_folder, capsys):
    from jobs.cli import main

    out = tmp_path / "out"
    with zio.output_lock(str(out)):
        assert main(["extract", "--input", str(image_folder), "--output", str(out)]) == 2
        assert f"(pid {os.getpid()}) is writing to this output" in capsys.readouterr().err
    with zio.output_lock(str(out)):  # released when the holder exits the block (or dies)
        pass


# ---------------------------------------------------------------- label


def _lcfg(w, out, **kw) -> LabelConfig:
    return LabelConfig(model=w["model"], features=w["features"], classes=w["classes"], output=str(out), **kw)


def _labels(out) -> pa.Table:
    return zpq.read_parquet_dir(str(out / "labels"))


def test_label_crash_then_rerun_labels_only_the_rest(small_world, tmp_path, monkeypatch):
    from pipeline.stages import label as labeling

    w = small_world(n_images=40, shard_size=8)
    labeling.run_label(_lcfg(w, tmp_path / "ref"), progress=False)
    real = _die_after_writes(monkeypatch, "atomic_parquet_writer", 2)
    with pytest.raises(Killed):
        labeling.run_label(_lcfg(w, tmp_path / "out"), progress=False)
    monkeypatch.setattr(zpq, "atomic_parquet_writer", real)
    assert not (tmp_path / "out" / "manifest.json").exists()
    (tmp_path / "out" / "labels" / f"{zio.TMP_PREFIX}0badf00d-{shard_name(2)}").write_bytes(b"PAR1 torn")
    m = labeling.run_label(_lcfg(w, tmp_path / "out"), progress=False)
    assert m.n_labeled_this_run == 24 and m.n_images == 40 and m.n_shards == 5
    assert _labels(tmp_path / "out").equals(_labels(tmp_path / "ref"))
    assert sorted(os.listdir(tmp_path / "out" / "labels")) == [shard_name(i) for i in range(5)]


def test_label_rerun_after_features_gained_shards_labels_only_new_ones(small_world, tmp_path):
    from pipeline.stages import label as labeling

    w = small_world(n_images=24, shard_size=8)
    labeling.run_label(_lcfg(w, tmp_path / "out"), progress=False)
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out" / "labels").iterdir()}
    bigger = small_world(n_images=40, shard_size=8)  # same seed: same first 24 images, two more shards
    assert bigger["features"] == w["features"]
    m = labeling.run_label(_lcfg(w, tmp_path / "out"), progress=False)
    assert m.n_labeled_this_run == 16 and m.n_images == 40
    assert {n: (tmp_path / "out" / "labels" / n).stat().st_mtime_ns for n in before} == before
    ids = _labels(tmp_path / "out").column("image_id").to_pylist()
    assert ids == [f"img{i:04d}" for i in range(40)]


def test_label_identity_ignores_extract_batch_settings_but_not_the_encoder(small_world, tmp_path):
    from pipeline.stages import label as labeling

    w = small_world()
    man_uri = zio.join(w["features"], "manifest.json")
    base = zio.read_json(man_uri)
    conf = {"input": "/data", "encoder": "fake-feat", "shard_size": 8, "batch_size": 64, "num_actors": None}
    zio.write_json_atomic(man_uri, {**base, "config": conf})
    labeling.run_label(_lcfg(w, tmp_path / "out"), progress=False)
    zio.write_json_atomic(man_uri, {**base, "config": {**conf, "batch_size": 8, "num_actors": 3, "limit": 2}})
    assert labeling.run_label(_lcfg(w, tmp_path / "out"), progress=False).n_labeled_this_run == 0
    zio.write_json_atomic(man_uri, {**base, "config": {**conf, "shard_size": 16}})
    with pytest.raises(ValueError, match="made from other inputs or settings"):
        labeling.run_label(_lcfg(w, tmp_path / "out"), progress=False)


def test_interrupted_class_set_update_is_never_mixed_into_labels(small_world, tmp_path, monkeypatch):
    """add-classes killed between classes.parquet and manifest.json: the set is the new one (its
    manifest travels inside the Parquet file), so a label rerun sees another class set and refuses."""
    from pipeline.stages import label as labeling
    from pipeline.semantics.classset import add_classes
    from pipeline.semantics.classset import load_class_set

    w = small_world()
    labeling.run_label(_lcfg(w, tmp_path / "out"), progress=False)
    (tmp_path / "new.csv").write_text("name,description\ntapir,a pig-like animal with a short trunk\n")
    real = zio.write_json_atomic

    def dying(uri, obj):
        if uri.endswith("classes/manifest.json"):
            raise Killed
        real(uri, obj)

    monkeypatch.setattr(zio, "write_json_atomic", dying)
    with pytest.raises(Killed):
        add_classes(w["classes"], str(tmp_path / "new.csv"), text_encoder=_Dim4())
    monkeypatch.setattr(zio, "write_json_atomic", real)
    cs = load_class_set(w["classes"])
    assert cs.names[-1] == "tapir" and cs.manifest.n_classes == 5
    with pytest.raises(ValueError, match="made from other inputs or settings"):
        labeling.run_label(_lcfg(w, tmp_path / "out"), progress=False)
    again, added = add_classes(w["classes"], str(tmp_path / "new.csv"), text_encoder=_Dim4())  # rerun: no-op
    assert added == [] and again.names == cs.names
    m = labeling.run_label(_lcfg(w, tmp_path / "out", overwrite=True), progress=False)
    assert m.classes[-1] == "tapir" and m.n_labeled_this_run == 40


class _Dim4:
    dim, model_id = 4, "fake-text"

    def encode(self, texts):
        rng = np.random.default_rng(len(texts))
        out = rng.standard_normal((len(texts), 4))
        return (out / np.linalg.norm(out, axis=1, keepdims=True)).astype(np.float32)


# ---------------------------------------------------------------- index


def _icfg(w, out, **kw) -> IndexConfig:
    return IndexConfig(features=w["features"], model=w["model"], output=str(out), use_gpu="no", **kw)


@pytest.fixture
def spy_projection(monkeypatch):
    from pipeline.zsl.models.eszsl import ESZSL

    calls: list[int] = []
    real = ESZSL.search_images

    def spy(self, X):
        calls.append(len(X))
        return real(self, X)

    monkeypatch.setattr(ESZSL, "search_images", spy)
    return calls


def _index_state(out):
    import faiss

    from pipeline.index.store import load_index

    index, ids, manifest = load_index(str(out))
    return faiss.rev_swig_ptr(index.get_xb(), index.ntotal * index.d).copy(), ids, manifest


def test_index_crash_then_rerun_projects_only_missing_shards(small_world, tmp_path, monkeypatch, spy_projection):
    from pipeline.stages.index import run_index

    w = small_world(n_images=40, shard_size=8)
    run_index(_icfg(w, tmp_path / "ref", index_factory="Flat"), progress=False)
    ref_vecs, ref_ids, _ = _index_state(tmp_path / "ref")
    spy_projection.clear()

    real = _die_after_writes(monkeypatch, "write_npy_atomic", 3)
    with pytest.raises(Killed):
        run_index(_icfg(w, tmp_path / "out", index_factory="Flat"), progress=False)
    monkeypatch.setattr(zio, "write_npy_atomic", real)
    assert len(spy_projection) == 4 and not (tmp_path / "out" / "manifest.json").exists()
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        _index_state(tmp_path / "out")
    spy_projection.clear()
    m = run_index(_icfg(w, tmp_path / "out", index_factory="Flat"), progress=False)
    assert spy_projection == [8, 8] and m.shards_projected_last_run == 2 and m.ntotal == 40
    vecs, ids, _ = _index_state(tmp_path / "out")
    np.testing.assert_array_equal(vecs, ref_vecs)
    assert ids.equals(ref_ids)
    assert sorted(os.listdir(tmp_path / "out")) == [".zsl.lock", "ids.parquet", "index.faiss", "manifest.json", "model", "run.json"]

    spy_projection.clear()  # a rerun of a finished build does nothing
    mtime = (tmp_path / "out" / "index.faiss").stat().st_mtime_ns
    assert run_index(_icfg(w, tmp_path / "out", index_factory="Flat"), progress=False).ntotal == 40
    assert spy_projection == [] and (tmp_path / "out" / "index.faiss").stat().st_mtime_ns == mtime


def test_index_killed_while_saving_is_never_loadable_and_reruns_from_the_cache(small_world, tmp_path, monkeypatch,
                                                                             spy_projection):
    from pipeline.stages.index import run_index

    w = small_world(n_images=40, shard_size=8)
    out = tmp_path / "out"
    run_index(_icfg(w, out, index_factory="Flat"), progress=False)  # an old, complete index
    small_world(n_images=48, shard_size=8)  # the features gained a shard: its vectors are added
    real = zpq.atomic_parquet_writer

    def dying(uri, schema):
        if uri.endswith("ids.parquet"):
            raise Killed
        return real(uri, schema)

    monkeypatch.setattr(zpq, "atomic_parquet_writer", dying)
    spy_projection.clear()
    with pytest.raises(Killed):
        run_index(_icfg(w, out, index_factory="Flat"), progress=False)
    monkeypatch.setattr(zpq, "atomic_parquet_writer", real)
    # the manifest is gone before anything changes: no reader pairs the old files with new ones
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        _index_state(out)
    n_projected = len(spy_projection)
    assert n_projected == 6
    spy_projection.clear()
    m = run_index(_icfg(w, out, index_factory="Flat"), progress=False)
    assert spy_projection == [] and m.ntotal == 48 and m.shards_projected_last_run == 0
    assert m.build == "build"  # unfinished output: rebuilt from the cache, each image once
    vecs, ids, _ = _index_state(out)
    assert len(set(ids.column("image_id").to_pylist())) == 48 == len(vecs) // 4


def test_index_cache_that_is_torn_or_pickled_is_recomputed_not_loaded(small_world, tmp_path, monkeypatch,
                                                                      spy_projection):
    import pipeline.stages.index as retrieval

    w = small_world(n_images=24, shard_size=8)
    out = tmp_path / "out"
    real_build = retrieval.build_index
    monkeypatch.setattr(retrieval, "build_index", _die)
    with pytest.raises(Killed):
        retrieval.run_index(_icfg(w, out, index_factory="Flat"), progress=False)
    monkeypatch.setattr(retrieval, "build_index", real_build)
    cached = sorted((out / "vectors").iterdir())
    assert [p.name for p in cached] == ["shard-000000.npy", "shard-000001.npy", "shard-000002.npy"]
    cached[0].write_bytes(cached[0].read_bytes()[:60])  # torn
    marker = tmp_path / "pwned"
    with open(cached[1], "wb") as f:  # a pickle bomb in place of the vectors
        np.save(f, np.array([_Evil(str(marker))], dtype=object), allow_pickle=True)
    np.save(cached[2], np.zeros((8, 3), np.float32))  # wrong shape
    spy_projection.clear()
    m = retrieval.run_index(_icfg(w, out, index_factory="Flat"), progress=False)
    assert spy_projection == [8, 8, 8] and m.ntotal == 24 and not marker.exists()


def _die(*args, **kwargs):
    raise Killed


class _Evil:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_index_with_another_model_is_refused_unless_overwrite_which_drops_the_old_cache(small_world, tmp_path, monkeypatch):
    import pipeline.stages.index as retrieval

    w = small_world(n_images=24, shard_size=8)
    out = tmp_path / "out"
    monkeypatch.setattr(retrieval, "build_index", _die)
    with pytest.raises(Killed):
        retrieval.run_index(_icfg(w, out, index_factory="Flat"), progress=False)
    monkeypatch.undo()
    assert len(os.listdir(out / "vectors")) == 3
    other = small_world(n_images=24, shard_size=8, name="other", seed=99)  # another model (and features)
    cfg = IndexConfig(features=w["features"], model=other["model"], output=str(out), index_factory="Flat",
                      use_gpu="no")
    with pytest.raises(ValueError, match=r"made from other inputs or settings \(model: was"):
        retrieval.run_index(cfg, progress=False)  # refused: the cache of another model stays as it was
    assert len(os.listdir(out / "vectors")) == 3
    m = retrieval.run_index(cfg.model_copy(update={"overwrite": True}), progress=False)
    assert m.shards_projected_last_run == 3 and m.model_dir == other["model"]
    assert not (out / "vectors").exists()


# ---------------------------------------------------------------- atomic writes: readers never see partial files


def test_reader_never_sees_a_partial_parquet_file_while_it_is_rewritten(tmp_path):
    uri = str(tmp_path / "t.parquet")
    big = pa.table({"x": np.arange(200_000), "y": np.random.default_rng(0).standard_normal(200_000)})
    zpq.write_parquet_atomic(uri, big.slice(0, 10))
    stop, seen, errors = threading.Event(), set(), []

    def reader():
        while not stop.is_set():
            try:
                seen.add(zpq.read_parquet(uri).num_rows)  # how every pipeline reader opens a file
            except Exception as exc:  # noqa: BLE001 - any failure is the bug this test looks for
                errors.append(exc)

    t = threading.Thread(target=reader)
    t.start()
    for i in range(30):
        zpq.write_parquet_atomic(uri, big if i % 2 == 0 else big.slice(0, 10))
    stop.set()
    t.join()
    assert errors == [] and seen <= {10, 200_000}
    assert not [f for f in os.listdir(tmp_path) if f.startswith(zio.TMP_PREFIX)]


def test_write_dying_half_way_leaves_old_content_or_nothing(tmp_path, monkeypatch):
    from fsspec.implementations.local import LocalFileOpener

    uri = str(tmp_path / "v.npy")
    zio.write_npy_atomic(uri, np.arange(5, dtype=np.float32))
    real_write = LocalFileOpener.write

    def half_then_die(self, data):
        real_write(self, bytes(data)[: len(data) // 2])
        raise Killed

    monkeypatch.setattr(LocalFileOpener, "write", half_then_die)
    with pytest.raises(Killed):
        zio.write_npy_atomic(uri, np.arange(1000, dtype=np.float32))
    with pytest.raises(Killed):
        zpq.write_parquet_atomic(str(tmp_path / "new.parquet"), pa.table({"a": [1, 2, 3]}))
    with pytest.raises(Killed):
        zio.write_bytes_atomic(str(tmp_path / "index.faiss"), b"x" * 10_000)
    monkeypatch.undo()
    np.testing.assert_array_equal(zio.read_npy(uri), np.arange(5, dtype=np.float32))
    assert sorted(os.listdir(tmp_path)) == ["v.npy"]
