"""Every command reads conf/<command>.yaml, takes --config and --set, and flags override only when given.

The stage each command calls is replaced by a spy that records the config it receives, so these
tests check the CLI's config layering alone (the stages have their own end-to-end tests).
"""

from __future__ import annotations

import importlib

import pytest

from jobs import common
from jobs.cli import main

# command -> (stage module, function, required flags, conf key, conf value, --set value, flag or None)
CASES = {
    "extract": ("pipeline.stages.extract", "run_extract", ["--input", "/in", "--output", "/out"],
                "shard_size", 17, 19, ["--shard-size", "23"]),
    "classes": ("pipeline.stages.classes", "run_classes", ["--input", "/c.yaml", "--output", "/out"],
                "attribute_normalization", "zscore", "none", ["--attribute-normalization", "l2"]),
    "train": ("pipeline.stages.train", "run_train", ["--features", "/f", "--classes", "/c", "--seen", "a,b,c",
                                                      "--output", "/m"], "method", "eszsl", "sae", ["--method", "dap"]),
    "evaluate": ("pipeline.stages.evaluate", "run_evaluate_all", ["--model", "/m", "--features", "/f", "--classes",
                                                                  "/c", "--unseen", "x,y"],
                 "transductive_alpha", 0.25, 0.75, None),
    "label": ("pipeline.stages.label", "run_label", ["--model", "/m", "--features", "/f", "--classes", "/c",
                                                      "--output", "/o"], "top_k", 3, 4, ["-k", "7"]),
    "index": ("pipeline.stages.index", "run_index", ["--features", "/f", "--model", "/m", "--output", "/o"],
              "max_memory", "1G", "2G", ["--max-memory", "3G"]),
    "search": ("pipeline.stages.search", "run_search", ["--index", "/i", "a query"], "k", 3, 4, ["-k", "7"]),
    "add-classes": ("pipeline.stages.label", "run_add_classes", ["--model", "/m", "--classes", "/c"],
                    "input", "/from-conf.yaml", "/from-set.yaml", ["--input", "/from-flag.yaml"]),
    "report": ("pipeline.stages.report", "run_report", ["--evaluation", "/e.json", "--output", "/r.html"],
               "title", "from conf", "from set", ["--title", "from flag"]),
    "serve": ("pipeline.stages.serve", "run_serve", ["--index", "/i"], "port", 8001, 8002, ["--port", "8003"]),
    "demo-data": ("pipeline.inputs.demo_data", "write_demo_data", [], "output", "/from-conf", "/from-set",
                  ["--output", "/from-flag"]),
}


class Captured(Exception):
    pass


@pytest.fixture
def spy(monkeypatch, tmp_path):
    """Point the CLI at an empty conf dir and replace each stage entry point by a recorder."""
    conf = tmp_path / "conf"
    conf.mkdir()
    monkeypatch.setattr(common, "CONF_DIR", conf)
    seen = {}

    def install(command: str):
        module, fn = CASES[command][:2]
        mod = importlib.import_module(module)

        def record(cfg, *args, **kwargs):
            seen["cfg"] = cfg if command != "demo-data" else {"output": cfg, **kwargs}
            raise Captured

        monkeypatch.setattr(mod, fn, record)
        return seen

    return conf, install


def _value(seen: dict, key: str):
    cfg = seen["cfg"]
    return cfg[key] if isinstance(cfg, dict) else getattr(cfg, key)


def _run(argv: list[str]) -> None:
    with pytest.raises(Captured):
        main(argv)


@pytest.mark.parametrize("command", sorted(CASES))
def test_conf_value_is_honoured_set_overrides_it_and_a_given_flag_wins(spy, command):
    conf, install = spy
    _, _, required, key, conf_value, set_value, flag = CASES[command]
    seen = install(command)
    (conf / f"{command}.yaml").write_text(f"{key}: {conf_value!r}\n".replace("'", '"'))
    _run([command, *required])
    assert _value(seen, key) == conf_value, "conf/<command>.yaml ignored"
    _run([command, *required, "--set", f"{key}={set_value}"])
    assert _value(seen, key) == set_value, "--set did not override conf"
    if flag:
        _run([command, *required, *flag, "--set", f"{key}={set_value}"])
        assert str(_value(seen, key)) == flag[-1], "a given flag must win"


@pytest.mark.parametrize("command", ["extract", "search", "label", "add-classes", "report", "demo-data"])
def test_config_file_layer_and_unknown_keys_name_their_file(spy, tmp_path, command, capsys):
    conf, install = spy
    install(command)
    extra = tmp_path / "mine.yaml"
    extra.write_text("no_such_key: 1\n")
    assert main([command, *CASES[command][2], "--config", str(extra)]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'no_such_key'" in err and "mine.yaml" in err
    (conf / f"{command}.yaml").write_text("typo_key: 1\n")
    assert main([command, *CASES[command][2]]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'typo_key'" in err and f"{command}.yaml" in err


def test_search_k_from_conf_is_not_overridden_by_a_flag_default(spy):
    conf, install = spy
    seen = install("search")
    (conf / "search.yaml").write_text("k: 3\n")
    _run(["search", "--index", "/i", "zebra"])
    assert seen["cfg"].k == 3


def test_serve_names_indexes_and_their_labels(spy, capsys):
    conf, install = spy
    seen = install("serve")
    _run(["serve", "--index", "/x/animals/", "--labels", "/x/labels"])
    assert seen["cfg"].indexes == {"animals": "/x/animals"} and seen["cfg"].labels == {"animals": "/x/labels"}
    _run(["serve", "--index", "a=/x/1", "--index", "b=/x/2", "--labels", "b=/x/l2"])
    assert seen["cfg"].labels == {"b": "/x/l2"}
    assert main(["serve", "--index", "a=/x/1", "--index", "b=/x/2", "--labels", "/x/l"]) == 2
    assert "say which index it labels with NAME=DIR" in capsys.readouterr().err
    assert main(["serve", "--index", "a=/x/1", "--labels", "c=/x/l"]) == 2
    assert "unserved index(es) c" in capsys.readouterr().err
