"""`zsl run`'s pipeline spec and the guarantees a scheduler relies on that need no pipeline run:
typed sections that refuse unknown keys (naming the section, its known keys and the file), one model
source, exit 2 on a bad spec, exit 75 while another run holds the lock (and waiting for it), and the
run record and report."""

from __future__ import annotations

import fcntl
import json
import os
import threading
import time

import pytest
import yaml

from jobs.cli import main
from pipeline.core.config import ConfigError, RunConfig, build_config
from pipeline.flows.living import EXIT_LOCKED, run_pipeline
from pipeline.flows.record import RunRecord, StageRecord, render_report


def _spec(tmp_path, **over) -> dict:
    spec = {"root": str(tmp_path / "out"), "inputs": [str(tmp_path / "in")], "classes": {"input": "c.yaml"},
            "train": {"seen": ["a", "b"]}}
    spec.update(over)
    return spec


def test_sections_are_the_stage_configs(tmp_path):
    cfg = build_config("run", ("p.yaml", _spec(tmp_path, label={"top_k": 3}, extract={"shard_size": 64})))
    assert isinstance(cfg, RunConfig)
    assert cfg.label.top_k == 3 and cfg.extract.shard_size == 64 and cfg.extract.encoder == "effnet-lite0"
    assert cfg.index is not None and cfg.captions is None
    lcfg = cfg.stage_config("label", model="/m", features="/f", classes="/c", output="/o", overwrite=True)
    assert lcfg.top_k == 3 and lcfg.output == "/o"


@pytest.mark.parametrize("section,key,known", [("label", "topk", "top_k"), ("index", "max_mem", "max_memory")])
def test_unknown_keys_are_refused_with_section_known_keys_and_file(tmp_path, section, key, known):
    with pytest.raises(ConfigError) as err:
        build_config("run", ("my-pipeline.yaml", _spec(tmp_path, **{section: {key: 1}})))
    msg = str(err.value)
    assert f"unknown key '{section}.{key}' in my-pipeline.yaml" in msg
    assert known in msg.split("known:")[1] and "inputs" not in msg.split("known:")[1]  # the section's keys


@pytest.mark.parametrize("section,key", [("extract", "output"), ("index", "features"), ("label", "overwrite")])
def test_keys_the_pipeline_sets_are_refused_as_such(tmp_path, section, key):
    with pytest.raises(ConfigError, match=rf"'{section}.{key}' in p.yaml is set by the pipeline"):
        build_config("run", ("p.yaml", _spec(tmp_path, **{section: {key: "x"}})))


def test_exactly_one_model_source(tmp_path):
    spec = _spec(tmp_path)
    spec["model"] = "/some/model"
    with pytest.raises(ConfigError, match="exactly one of"):
        build_config("run", ("p.yaml", spec))
    del spec["model"], spec["train"]
    with pytest.raises(ConfigError, match="exactly one of"):
        build_config("run", ("p.yaml", spec))


def test_bad_spec_exits_2_and_names_the_key(tmp_path, capsys):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(_spec(tmp_path, label={"top_kk": 3})))
    assert main(["run", str(path)]) == 2
    assert "label.top_kk" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_set_overrides_nested_keys(tmp_path, capsys):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(_spec(tmp_path)))
    assert main(["run", str(path), "--set", "label.bogus=3"]) == 2
    assert "label.bogus" in capsys.readouterr().err


def test_a_second_run_exits_75_while_the_lock_is_held_and_can_wait(tmp_path):
    cfg = build_config("run", ("p.yaml", _spec(tmp_path)))
    os.makedirs(cfg.root)
    fd = os.open(os.path.join(cfg.root, ".zsl-run.lock"), os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    released = threading.Event()

    def release() -> None:
        if not released.is_set():
            released.set()
            os.close(fd)

    timer = threading.Timer(1.0, release)
    try:
        t0 = time.monotonic()
        rec = run_pipeline(cfg, progress=False)
        assert rec.exit_code == EXIT_LOCKED and "another" in rec.message and time.monotonic() - t0 < 5
        assert not os.path.exists(os.path.join(cfg.root, "runs"))  # the holder owns runs/
        timer.start()  # released in a second: a waiting run goes on
        rec = run_pipeline(cfg, progress=False, wait_s=30)
        assert rec.exit_code != EXIT_LOCKED  # it got the lock (and then found no input: bad input)
        assert rec.exit_code == 2 and os.path.exists(os.path.join(cfg.root, "runs", rec.run_id, "record.json"))
    finally:
        timer.cancel()
        release()


def test_report_shows_stages_failures_and_the_label_diff(tmp_path):
    cfg = build_config("run", ("p.yaml", _spec(tmp_path)))
    rec = RunRecord.start(cfg, spec="p.yaml")
    rec.stages = [StageRecord("extract", did="extracted 12 images in 1 shard(s)",
                              failed=[{"item": "dog/<b>bad</b>.png", "reason": "cannot identify image"}]),
                  StageRecord("label", did="relabelled 40 images", details={"diff": {
                      "moved": 3, "compared": 40, "pairs": [{"old": "dog", "new": "cat", "n": 3}]}})]
    rec.finish("done with failed items", 3, "1 failed item(s)")
    page = render_report(rec, str(tmp_path))
    assert "extracted 12 images" in page and "cannot identify image" in page
    assert "<b>bad</b>" not in page and "&lt;b&gt;bad&lt;/b&gt;" in page  # escaped
    assert "3 of 40 images changed label" in page and "<td>dog</td><td>cat</td><td>3</td>" in page
    json.dumps(rec.to_json())


def test_preflight_refuses_a_seen_class_missing_from_the_table_before_any_stage(tmp_path):
    table = tmp_path / "c.yaml"
    table.write_text(yaml.safe_dump({"classes": [{"name": "a"}, {"name": "b"}]}))
    (tmp_path / "in" / "a").mkdir(parents=True)
    cfg = build_config("run", ("p.yaml", _spec(tmp_path, classes={"input": str(table)}, train={"seen": ["a", "z"]})))
    rec = run_pipeline(cfg, progress=False)
    assert rec.exit_code == 2 and "train.seen: z not in the class table" in rec.message
    assert rec.stages == [] and sorted(os.listdir(cfg.root)) == [".zsl-run.lock", "runs"]


def test_report_thumbnails_read_files_and_tar_members(tmp_path):
    import io
    import tarfile

    from PIL import Image

    from pipeline.flows.record import _thumbnail

    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(buf, format="PNG")
    (tmp_path / "a.png").write_bytes(buf.getvalue())
    with tarfile.open(tmp_path / "s.tar", "w") as tar:
        for name in ("k1.json", "k1.png"):
            data = b"{}" if name.endswith(".json") else buf.getvalue()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    assert _thumbnail(str(tmp_path / "a.png")).startswith("data:image/jpeg;base64,")
    assert _thumbnail(f"{tmp_path / 's.tar'}::k1.png").startswith("data:image/jpeg;base64,")
    assert _thumbnail(f"{tmp_path / 's.tar'}::nope.png") is None and _thumbnail(str(tmp_path / "gone.png")) is None
