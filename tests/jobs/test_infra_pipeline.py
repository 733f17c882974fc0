"""The scheduler files in infra/ run `zsl run` on a spec that validates (the spec the ConfigMap carries)."""

from __future__ import annotations

from pathlib import Path

import yaml

from jobs.common import key_values
from jobs.living import _deep_set
from pipeline.core.config import build_config

INFRA = Path(__file__).resolve().parents[2] / "infra"


def _args(doc: dict) -> list[str]:
    if doc["kind"] == "CronJob":
        return doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["args"]
    return doc["spec"]["entrypoint"].split()[1:]  # RayJob: "zsl run ..."


def test_infra_spec_validates_as_the_scheduled_jobs_give_it():
    for name in ("cronjob-pipeline.yaml", "rayjob-pipeline.yaml"):
        doc = yaml.safe_load((INFRA / name).read_text())
        args = _args(doc)
        assert args[:2] == ["run", "/etc/zsl/pipeline.yaml"], name
        spec = yaml.safe_load((INFRA / "pipeline.yaml").read_text())
        sets = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
        for k, v in key_values(sets).items():
            _deep_set(spec, k, v)
        cfg = build_config("run", (name, spec))
        assert cfg.inputs and cfg.train is not None and cfg.index is not None
        if doc["kind"] == "RayJob":
            assert cfg.address == "auto"


def test_cronjob_never_runs_two_at_once_and_does_not_retry_bad_input():
    doc = yaml.safe_load((INFRA / "cronjob-pipeline.yaml").read_text())
    assert doc["spec"]["concurrencyPolicy"] == "Forbid"
    rules = doc["spec"]["jobTemplate"]["spec"]["podFailurePolicy"]["rules"]
    assert rules[0]["onExitCodes"]["values"] == [2, 3]
