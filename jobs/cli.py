"""The ``zsl`` command line: one thin entry point per job, registered here in the order ``zsl --help`` lists.

The commands live beside this module, grouped by what they make (:mod:`jobs.living`, :mod:`jobs.prepare`, :mod:`jobs.labeling`,
:mod:`jobs.retrieval`, :mod:`jobs.interop`); what they share (config layering, logging, exit status 2
on bad input, common options) is :mod:`jobs.common`.
"""

from __future__ import annotations

import sys

import typer

from jobs import interop, labeling, living, prepare, retrieval

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Zero-shot labeling and text retrieval of images at scale.")

COMMANDS = {
    "run": living.run,
    "extract": prepare.extract,
    "classes": prepare.classes,
    "train": labeling.train,
    "methods": labeling.methods,
    "evaluate": labeling.evaluate,
    "label": labeling.label,
    "index": retrieval.index,
    "serve": retrieval.serve,
    "search": retrieval.search,
    "add-classes": labeling.add_classes,
    "report": labeling.report,
    "demo-data": prepare.demo_data,
    "embed-text": interop.embed_text,
    "export": interop.export,
    "import": interop.import_cmd,
    "corpus": interop.corpus,
    "bridge": interop.bridge,
}
for _name, _fn in COMMANDS.items():
    app.command(_name)(_fn)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI in-process; return the exit status (tests call this).

    Typer runs in standalone mode, so usage errors print click's message and exit 2 exactly as the
    console script does; the SystemExit is turned into a return value.
    """
    try:
        app(args=list(argv if argv is not None else sys.argv[1:]), prog_name="zsl", standalone_mode=True)
    except SystemExit as exc:
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    return 0


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())


if __name__ == "__main__":
    run()
