"""Every ``python -m pcm_train.*`` command shares one frame: -h, one ``error:`` line and exit 2 for bad input."""
import importlib

import pytest

from pcm_train import cli

# (module, a bad command line, a word the error names)
COMMANDS = [
    ("pcm_train.run", ["pcm.budget=0"], "pcm.budget"),
    ("pcm_train.sft", ["epochs=-1"], "demos=DIR is required"),
    ("pcm_train.demos", ["per_task=0"], "out=DIR is required"),
    ("pcm_train.study", ["seeds=[]"], "seeds"),
    ("pcm_train.report", ["/nonexistent/run"], "/nonexistent/run"),
    ("pcm_train.knee", ["/nonexistent/run"], "/nonexistent/run"),
    ("pcm_train.merge_lora", ["/nonexistent/base", "/nonexistent/adapters", "/tmp/out"], "/nonexistent"),
    ("pcm_train.estimator_variance", ["--draws", "0"], "--draws"),
    ("pcm_train.compare_update", ["--budget", "0"], "--budget"),
    ("pcm_train.gradient_signal", ["--prompts", "1"], "--prompts"),
]


@pytest.mark.parametrize("module,bad,word", COMMANDS)
def test_help_and_bad_input(module, bad, word, capsys):
    main = importlib.import_module(module).main
    try:
        code = main(["-h"])
    except SystemExit as exit_:  # argparse's help
        code = exit_.code
    assert code == 0 and capsys.readouterr().out.strip()
    try:
        code = main(bad)
    except SystemExit as exit_:  # argparse's own usage errors: also "error:" and 2
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert "error: " in err and word in err and "Traceback" not in err


def test_the_frame_catches_one_set_and_lets_bugs_be_debugged(monkeypatch, capsys):
    def fails(error):
        def body(argv):
            raise error
        return body

    for error in (ValueError("bad value"), FileNotFoundError("no file"), KeyError("key"), RuntimeError("gave up")):
        assert cli.run_command("doc", fails(error), []) == 2
        assert capsys.readouterr().err.startswith("error: ")
    assert cli.run_command("doc", fails(KeyboardInterrupt()), [], interrupted="stopped") == 130
    assert capsys.readouterr().err.strip() == "stopped"
    with pytest.raises(TypeError):  # not an input error: a bug keeps its traceback
        cli.run_command("doc", fails(TypeError("bug")), [])
    monkeypatch.setenv("PCM_TRACEBACK", "1")
    with pytest.raises(ValueError):
        cli.run_command("doc", fails(ValueError("bad value")), [])
